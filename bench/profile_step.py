"""Profile of a real MAE pretraining step: the share spent on the attention-similarity pass, the
mask op and the rest (encoder, decoder, loss, backward, optimiser), per masking strategy.

The EHM paper reports 8.1% of the step for its masking overall and 0.2% for the tree. Phases are
timed with CUDA events around each phase of the step (median over steps after warm-up); one
extra step per strategy runs under ``torch.profiler`` and its top kernels go to the log.

    python bench/profile_step.py                                  # ViT-B/16, 224 px, batch 128
    python bench/profile_step.py --model tiny --img-size 64 --patch-size 8 --batch-size 16 --device cpu
    python bench/profile_step.py --attention-path fused hook      # A/B of attention_maps' two paths

``--attention-path`` picks how :func:`evomask_ext.attention_maps` reads the attention: ``fused``
(the default, as the trainer runs: timm's plain ``Attention`` blocks run fused and the
probabilities are computed from their q and k) or ``hook`` (every block unfused, the softmax read
by a hook on ``attn_drop``: the only path before, and the one for every other attention). Each
strategy that reads attention is profiled once per path given; the others (``random``) once. The
path asked for and the paths ``attention_maps`` actually took are in each result.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from evomask_ext import EvolvedMasker
from evomask_ext import attention as attention_module
from evomask_train.mask_fn import ModelMasks
from evomask_train.model import build_mae


class Clock:
    """CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, stop) -> float:
        if self.cuda:
            stop.synchronize()
            return start.elapsed_time(stop)
        return (stop - start) * 1e3


class PhaseMasker(ModelMasks):
    """The trainer's mask function (:class:`evomask_train.mask_fn.ModelMasks`) with a mark between
    the attention pass and the mask op."""

    def __init__(self, mask_name: str, attn_layers: int, clock: Clock, progress: float):
        super().__init__(EvolvedMasker(mask_name, 0.75, seed=0), attn_layers)
        self.clock = clock
        self.step, self.total_steps = round(progress * 1000), 1000
        self.marks = []

    def __call__(self, imgs, tokens, model):
        t0 = self.clock.mark()
        with torch.profiler.record_function("evomask::attention_similarity"):
            maps = self.attention(tokens, model)
        t1 = self.clock.mark()
        with torch.profiler.record_function("evomask::mask"):
            mask = self.mask(imgs, tokens, model, maps)
        t2 = self.clock.mark()
        self.marks.append((t0, t1, t2))
        return mask


ATTENTION_PATHS = ("fused", "hook")


def profile(args, mask_name: str, device: torch.device, path: str = "fused") -> dict:
    """One strategy's step profile with attention_maps on ``path`` ("fused" or "hook")."""
    saved = attention_module._FUSED_PATH
    before = attention_module._PATH_CALLS.copy()
    attention_module._FUSED_PATH = path == "fused"
    try:
        result = _profile(args, mask_name, device)
    finally:
        attention_module._FUSED_PATH = saved
    taken = attention_module._PATH_CALLS - before
    if taken and set(taken) != {path}:
        print(f"WARNING: {mask_name}: asked for the {path} attention path, attention_maps took {dict(taken)}",
              file=sys.stderr)
    return {"mask": mask_name, "attention_path": path, "attention_path_taken": dict(taken), **result}


def _profile(args, mask_name: str, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_mae(args.model, args.img_size, args.patch_size).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    depth = len(model.blocks)
    clock = Clock(device)
    masker = PhaseMasker(mask_name, args.attn_layers or depth // 2, clock, args.progress)
    imgs = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    bf16 = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _, _ = model(imgs, mask_fn=masker)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    steps, attn, mask = [], [], []
    for i in range(args.warmup + args.steps):
        masker.marks.clear()
        start = clock.mark()
        step()
        stop = clock.mark()
        if i >= args.warmup:
            t0, t1, t2 = masker.marks[0]
            steps.append(clock.ms(start, stop))
            attn.append(clock.ms(t0, t1))
            mask.append(clock.ms(t1, t2))
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=15)
    step_ms, attn_ms, mask_ms = (statistics.median(v) for v in (steps, attn, mask))
    return {
        "step_ms": step_ms,
        "attention_ms": attn_ms,
        "mask_op_ms": mask_ms,
        "rest_ms": step_ms - attn_ms - mask_ms,
        "attention_share": attn_ms / step_ms,
        "mask_op_share": mask_ms / step_ms,
        "profiler_top": table,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--attn-layers", type=int, default=None, help="default: half the depth")
    parser.add_argument("--progress", type=float, default=0.5, help="training progress t/T for the masks")
    parser.add_argument("--masks", nargs="+", default=["random", "ehm", "epm"])
    parser.add_argument("--attention-path", nargs="+", choices=ATTENTION_PATHS, default=["fused"],
                        help="attention_maps' path: fused (default, timm Attention blocks) and/or hook (A/B)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="output stem (.json, .txt)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    env = {"date": dt.date.today().isoformat(), "torch": torch.__version__, "device": str(device),
           "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "command": " ".join(sys.argv)}
    paths = list(dict.fromkeys(args.attention_path))
    results = []
    for name in args.masks:
        reads = bool(EvolvedMasker(name, 0.75, seed=0).needs & {"attn", "cls_attn"})
        results += [profile(args, name, device, path) for path in (paths if reads else paths[:1])]
    header = f"{'mask':<10}{'path':<7}{'step ms':>10}{'attn ms':>10}{'mask ms':>10}{'attn %':>9}{'mask %':>9}"
    lines = [json.dumps(env), f"model {args.model}, {args.img_size} px, patch {args.patch_size}, batch {args.batch_size}",
             header, "-" * len(header)]
    for r in results:
        path = "+".join(sorted(r["attention_path_taken"])) or "-"  # the path(s) attention_maps took
        lines.append(f"{r['mask']:<10}{path:<7}{r['step_ms']:>10.2f}{r['attention_ms']:>10.2f}{r['mask_op_ms']:>10.2f}"
                     f"{100 * r['attention_share']:>8.2f}%{100 * r['mask_op_share']:>8.2f}%")
    print("\n".join(lines))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"environment": env, "args": vars(args) | {"out": str(args.out)},
                                                             "results": results}, indent=1, default=str))
        args.out.with_suffix(".txt").write_text("\n".join(lines) + "\n\n" + "\n\n".join(
            f"== {r['mask']} ({r['attention_path']} attention path)\n{r['profiler_top']}" for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
