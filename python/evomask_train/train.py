"""evomask-pretrain: MAE pretraining whose mask of every step comes from ``torch.ops.evomask``.

A thin loop in the spirit of MAE's ``main_pretrain.py``: AdamW (0.9, 0.95), cosine schedule with
warmup, bf16 autocast on CUDA, gradient accumulation, DDP under ``torchrun``, atomic
checkpoints with every RNG state (so a resumed run continues bit for bit), a tqdm bar,
``metrics.csv`` plus TensorBoard, and mask galleries. A run holds its output folder (a lock file,
see :mod:`evomask_train.run_lock`) and resumes only a checkpoint saved with the same model, data
and mask flags.

Each step embeds the batch once; the masking strategy sees that embedding and, for the
attention-driven strategies, runs the current encoder's first ``--attn-layers`` blocks on the
full sequence without gradients (EHM Sec. V-E) before the encoder sees only the visible patches.
With ``--attn-source ema`` those blocks are an EMA copy's (:mod:`evomask_train.ema`), run on the
online model's tokens, as the EPM authors' released code does.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import evomask_ext
from evomask_ext.attention import attention_maps
from evomask_ext._checks import largest_keeping_ratio, smallest_masking_ratio
from evomask_ext.masking import STRATEGIES, MaskContext, MaskStrategy, build_strategy

from .checkpoint import latest_valid_checkpoint, list_checkpoints, load_checkpoint, prune_checkpoints, save_atomic
from .run_lock import FolderBusy, RunLock
from .data import build_dataset, build_loader, set_loader_epoch
from .ema import EMATeacher
from .gallery import save_gallery
from .model import MODEL_SIZES, MaskedAutoencoder, build_mae

__all__ = ["build_parser", "main", "train", "TrainingStopped", "NonFiniteError"]


class TrainingStopped(RuntimeError):
    """The run stopped on a fault it can explain (divergence, an unwritable output folder, bad data).

    ``main`` prints the message and exits with status 3 instead of a traceback; the checkpoints
    written before the fault are untouched, so the run can be resumed once the cause is fixed.
    """


class NonFiniteError(TrainingStopped, FloatingPointError):
    """The loss, the gradients or the masking attention turned NaN/Inf: the step was not taken."""


def _number(kind: type, test, expected: str):
    """An argparse type: parses ``kind`` and rejects values failing ``test`` with what was expected."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    parse.__name__ = expected  # argparse names the type in its messages
    return parse


positive_int = _number(int, lambda v: v > 0, "an integer >= 1")
nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
nonnegative_float = _number(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
open_unit_float = _number(float, lambda v: 0 < v < 1, "a number in (0, 1)")


def attn_layers_arg(text: str) -> int | str:
    """``--attn-layers``: a block count >= 1 or ``all``."""
    if text == "all":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'all', got {text!r}") from None


attn_layers_arg.__name__ = "an integer >= 1 or 'all'"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where it says something: not when the help already states its
    default in words, nor for a default of None or a plain on/off switch."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default:" in text or "(default" in text or action.default in (None, argparse.SUPPRESS):
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The ``evomask-pretrain`` argument parser."""
    p = argparse.ArgumentParser(
        prog="evomask-pretrain",
        description="MAE pretraining with evolved masks (EHM/EPM) or the baselines, masks from torch.ops.evomask.",
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, default=None,
                   help="ImageFolder-style folder of images (labels unused); default: the embedded scikit-image photos")
    g.add_argument("--dataset-length", type=positive_int, default=1024,
                   help="samples per epoch of the embedded default dataset (random crops)")
    g.add_argument("--num-workers", type=nonnegative_int, default=0, help="DataLoader worker processes")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=nonnegative_int, default=0,
                   help="k-NN top-1 of the encoder on --eval-data every this many epochs (0: off): metrics.csv "
                        "column knn_top1, TensorBoard eval/knn_top1")
    g.add_argument("--eval-data", default="digits",
                   help="labelled data of --eval-every: 'digits' (embedded, scikit-learn) or a folder with train/ "
                        "and val/ ImageFolder trees")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=sorted(MODEL_SIZES), default="tiny", help="ViT encoder size (MAE decoder scaled with it)")
    g.add_argument("--img-size", type=positive_int, default=224, help="input resolution in pixels")
    g.add_argument("--patch-size", type=positive_int, default=16, help="patch side in pixels")
    g.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="regress per-patch normalised pixels (MAE's best setting)")
    g = p.add_argument_group("masking")
    g.add_argument("--mask", choices=sorted(STRATEGIES), default="ehm", help="masking strategy")
    g.add_argument("--mask-ratio", type=open_unit_float, default=0.75, help="fraction of patches masked")
    g.add_argument("--attn-layers", type=attn_layers_arg, default=None,
                   help="the first encoder blocks whose attention gives the masks, or 'all' (default: half the depth)")
    g.add_argument("--attn-reduce", choices=["mean", "sum"], default="mean",
                   help="ehm/epm: average the attention over heads and layers (the papers) or sum it (the EPM release)")
    g.add_argument("--attn-source", choices=["online", "ema"], default="online",
                   help="ehm/epm/attn: attention of the encoder being trained, or of an EMA copy of the model run "
                        "on the online model's patch tokens (the EPM release)")
    g.add_argument("--ema-decay", type=open_unit_float, default=0.99996,
                   help="--attn-source ema: ema = decay * ema + (1 - decay) * online after every optimiser step")
    g.add_argument("--selective-steps", type=positive_int, default=10,
                   help="selective: S schedule steps; step 0 masks at random, later ones by a frozen snapshot's errors")
    g.add_argument("--selective-probes", type=positive_int, default=5,
                   help="selective: R random-mask passes of the snapshot per batch (R extra forwards)")
    g.add_argument("--num-parts", type=positive_int, default=None,
                   help="epm: a fixed number of parts K (default: EPM's schedule, 40 falling to 10)")
    g.add_argument("--gamma", type=nonnegative_float, default=2.0,
                   help="epm: alpha = (t / T) ** gamma blends the grid pattern into whole parts")
    g.add_argument("--em-iters", type=nonnegative_int, default=10, help="epm: Gaussian-mixture EM iterations per batch")
    g.add_argument("--epm-variant", choices=["paper", "released"], default="paper",
                   help="epm: the paper's diagonal GMM, alpha = (t/T)^gamma, or the authors' released code (vMF "
                        "parts, K jittered per batch, alpha = sqrt(t/T + 1/300); --gamma and --em-iters not used)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=400, help="training epochs")
    g.add_argument("--max-steps", type=nonnegative_int, default=None,
                   help="stop after this many optimiser steps in total (the schedule still spans --epochs)")
    g.add_argument("--batch-size", type=positive_int, default=64, help="images per step per process")
    g.add_argument("--accum-iter", type=positive_int, default=1, help="gradient accumulation steps per optimiser step")
    g.add_argument("--blr", type=positive_float, default=1.5e-4, help="base learning rate: lr = blr * effective batch / 256")
    g.add_argument("--lr", type=positive_float, default=None, help="absolute learning rate (overrides --blr)")
    g.add_argument("--min-lr", type=nonnegative_float, default=0.0, help="floor of the cosine schedule")
    g.add_argument("--warmup-epochs", type=nonnegative_float, default=40, help="linear warmup length in epochs")
    g.add_argument("--weight-decay", type=nonnegative_float, default=0.05, help="AdamW weight decay (not on biases/norms/tokens)")
    g.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto",
                   help="mixed precision: auto = bf16 autocast on CUDA, off on CPU")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:K")
    g.add_argument("--output-dir", type=Path, default=Path("out/pretrain"), help="metrics, checkpoints, galleries")
    g.add_argument("--seed", type=nonnegative_int, default=0, help="seed of weights, data order, crops and masks")
    g.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms(True) and CUBLAS_WORKSPACE_CONFIG=:4096:8 for the run "
                        "(deterministic kernels or an error, somewhat slower; bitwise-repeatable CUDA runs are not "
                        "verified). CPU runs are bitwise repeatable from --seed for the same thread count, with or "
                        "without it")
    g.add_argument("--resume", default=None,
                   help="checkpoint file to resume from, or 'auto' for the newest valid one in --output-dir. "
                        "The run stops (exit 3) when a flag that shapes the model, the data order or the masks "
                        f"differs from the checkpoint's: {', '.join(_flag(d) for d in _MUST_MATCH)}, the number "
                        "of processes, --attn-layers and --attn-reduce for ehm/epm, --attn-source (and --ema-decay "
                        "with ema) for ehm/epm/attn, and the strategy's own options (--selective-*; --num-parts, "
                        "--gamma, --em-iters, --epm-variant). --epochs, --blr, --lr, --min-lr, --warmup-epochs and "
                        "--weight-decay may change: the schedule is recomputed with them and applies from the "
                        "resumed step (the learning rate may jump; a line says by how much). All other flags "
                        "are free (with --data, another --num-workers gives other random crops)")
    g.add_argument("--save-every", type=positive_int, default=200, help="checkpoint every this many optimiser steps (and at each epoch end)")
    g.add_argument("--keep-checkpoints", type=positive_int, default=2, help="step checkpoints kept on disk")
    g.add_argument("--gallery-every", type=positive_int, default=10, help="write a mask gallery every this many epochs (and at the end)")
    g.add_argument("--gallery-images", type=positive_int, default=4, help="images in each gallery")
    g.add_argument("--log-every", type=positive_int, default=10, help="metrics.csv / TensorBoard every this many optimiser steps")
    return p


# --------------------------------------------------------------------------------------------
# distributed and small utilities


def _check_device(device_arg: str) -> None:
    try:
        device = torch.device(device_arg)
    except (RuntimeError, ValueError) as exc:
        raise TrainingStopped(f"--device {device_arg!r} is not a device (cpu, cuda or cuda:K): {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingStopped(f"--device {device_arg}: no CUDA device is available here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TrainingStopped(f"--device {device_arg}: only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type != "cpu":
        raise TrainingStopped(f"--device {device_arg}: expected cpu, cuda or cuda:K")


def _init_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    _check_device(device_arg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(device_arg)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.device(device_arg).type == "cuda":
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend=backend)
    return rank, world, device


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith("token") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _cosine_with_warmup(total_steps: int, warmup_steps: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return factor


def _epoch_loader(loader: DataLoader, epoch: int, skip_batches: int) -> DataLoader:
    """The loader of ``epoch``, starting after ``skip_batches`` batches (exact mid-epoch resume).

    The skipped part is cut from the sampler's index order, so no image is loaded for nothing.
    """
    set_loader_epoch(loader, epoch)
    if skip_batches == 0:
        return loader
    order = list(loader.sampler)[skip_batches * loader.batch_size :]
    return DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=order, num_workers=loader.num_workers,
        drop_last=loader.drop_last, pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn,
        generator=loader.generator,
    )


class _MetricsLog:
    """metrics.csv (append-safe across resumes) plus TensorBoard when it is installed."""

    FIELDS = ("step", "epoch", "progress", "loss", "lr", "mask_ms", "step_ms", "images_per_s", "knn_top1")

    def __init__(self, folder: Path, resumed_step: int):
        self.path = folder / "metrics.csv"
        rows = []
        if self.path.exists():  # keep what was logged up to the checkpoint we resume from
            with self.path.open() as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= resumed_step]
        # Rewritten through a temporary file: a failed write (disk full) must not lose the old rows.
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            with tmp.open("w", newline="") as f:
                writer = csv.DictWriter(f, self.FIELDS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(folder / "tensorboard"), purge_step=resumed_step + 1)
        except ImportError:
            self.tb = None

    def write(self, row: dict) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.FIELDS).writerow(row)
        if self.tb is not None:
            for key in ("loss", "lr", "mask_ms", "step_ms", "images_per_s"):
                self.tb.add_scalar(f"train/{key}", row[key], row["step"])

    def write_eval(self, row: dict) -> None:
        """A row of its own for a k-NN evaluation (the step columns stay empty)."""
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.FIELDS).writerow(row)
        if self.tb is not None:
            self.tb.add_scalar("eval/knn_top1", row["knn_top1"], row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class StepMasker:
    """Builds a step's mask from the model's own patch embedding, for :meth:`MaskedAutoencoder.forward`."""

    def __init__(self, strategy: MaskStrategy, attn_layers: int, generator: torch.Generator, *,
                 teacher: EMATeacher | None = None, reduce: str = "mean"):
        self.strategy = strategy
        self.attn_layers = attn_layers
        # With a teacher its blocks read the online model's tokens: the EPM release's EMA attention.
        self.teacher = teacher
        self.reduce = reduce
        self.generator = generator
        self.progress = 0.0
        self.step = 0  # optimiser step, for messages
        self.last_ms = 0.0
        self.last_similarity: torch.Tensor | None = None  # the [B, N, N] attention of the last mask, if any

    def __call__(self, imgs: torch.Tensor, tokens: torch.Tensor, model: MaskedAutoencoder) -> torch.Tensor:
        started = time.perf_counter()
        needs = self.strategy.needs
        maps = None
        self.last_similarity = None
        if needs & {"attn", "cls_attn"}:
            source = self.teacher.module if self.teacher is not None else model
            maps = attention_maps(
                source.blocks, tokens, patch_layers=self.attn_layers if "attn" in needs else 0,
                cls_from_last="cls_attn" in needs, reduce=self.reduce,
            )
            # A diverged encoder gives NaN/Inf attention; the masking ops must never see it.
            for name, value in (("patch attention", maps.patch), ("[CLS] attention", maps.cls)):
                if value is not None and not bool(torch.isfinite(value).all()):
                    raise NonFiniteError(
                        f"the {name} of the encoder's first blocks is NaN/Inf at step {self.step}: the model "
                        "has diverged, so no mask was drawn and the step was not taken. Resume from the last "
                        "checkpoint with a lower learning rate (--blr) or more warmup."
                    )
            self.last_similarity = maps.patch
        ctx = MaskContext(
            batch_size=tokens.shape[0], grid=model.cfg.grid, device=tokens.device, generator=self.generator,
            attn=maps.patch if maps is not None else None, cls_attn=maps.cls if maps is not None else None,
            images=imgs if "images" in needs else None, model=model if "model" in needs else None,
        )
        mask = self.strategy(ctx, self.progress)
        if tokens.is_cuda:
            torch.cuda.synchronize(tokens.device)
        self.last_ms = (time.perf_counter() - started) * 1e3
        return mask


def _rng_state(generators: dict[str, torch.Generator], device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), **{k: g.get_state() for k, g in generators.items()}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, generators: dict[str, torch.Generator], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    for key, gen in generators.items():
        gen.set_state(state[key])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _write_or_stop(write, path: Path, step: int, row: dict) -> None:
    try:
        write(row)
    except OSError as exc:
        raise TrainingStopped(f"could not write {path} at step {step}: {exc}") from exc


def _remove_partial_checkpoints(folder: Path) -> None:
    """Deletes the temporary files of checkpoint writes that a kill interrupted (never a checkpoint)."""
    for partial in folder.glob(".checkpoint-*.pt.*.tmp"):
        print(f"[evomask] removing {partial.name}, left by a checkpoint write that was interrupted", flush=True)
        partial.unlink(missing_ok=True)


def _jsonable_args(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _hold_output_dir(out: Path, cleanup: contextlib.ExitStack) -> None:
    """Creates ``out`` and takes its run lock until ``cleanup`` closes, then removes partial checkpoints.

    The partial files are only removed once the folder is ours: before, they may be the writes
    in flight of another run on the same folder.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainingStopped(f"cannot create --output-dir {out}: {exc}") from exc
    lock = RunLock(out)
    try:
        lock.acquire()
    except FolderBusy as exc:
        raise TrainingStopped(f"--output-dir {exc}") from None
    except OSError as exc:
        raise TrainingStopped(f"cannot write the lock file {lock.path} of --output-dir: {exc}") from exc
    cleanup.callback(lock.release)
    if lock.took_over:
        print(f"[evomask] {lock.took_over}", flush=True)
    _remove_partial_checkpoints(out)


def _check_mask_ratio(ratio: float, n: int) -> None:
    """Refuses a ratio that masks none or all of the ``n`` patches under MAE's ``N - int(N (1 - r))``.

    The masking ops refuse it too, but only at the first step and as a traceback.
    """
    count = n - int(n * (1 - ratio))
    if 0 < count < n:
        return
    what = "masks no patch" if count == 0 else "keeps no patch visible"
    rule = f"N - int(N * (1 - r)) = {count} of N = {n} patches"
    if n < 2:
        raise TrainingStopped(f"--mask-ratio {ratio} {what} ({rule}); with one patch no ratio masks one and "
                              "keeps one: use a smaller --patch-size")
    raise TrainingStopped(f"--mask-ratio {ratio} {what} ({rule}): use a ratio from {smallest_masking_ratio(n)!r} "
                          f"to {largest_keeping_ratio(n)!r} for N = {n}")


#: Flags a resumed run must share with its checkpoint: they shape the model, the data or the masks.
_MUST_MATCH = ("model", "img_size", "patch_size", "norm_pix_loss", "data", "dataset_length", "batch_size",
               "accum_iter", "seed", "mask", "mask_ratio")
#: A strategy's own options, compared only when resuming that strategy.
_STRATEGY_OPTIONS = {"selective": ("selective_steps", "selective_probes"),
                     "epm": ("num_parts", "gamma", "em_iters", "epm_variant")}
#: The value of a flag that a checkpoint saved before the flag existed ran with.
_BEFORE_THE_FLAG = {"epm_variant": "paper", "attn_source": "online", "attn_reduce": "mean"}
#: Flags that may change on resume: the learning-rate schedule and regularisation, recomputed with them.
_SCHEDULE = ("epochs", "blr", "lr", "min_lr", "warmup_epochs", "weight_decay")


def _resume_mismatches(saved: dict, args: argparse.Namespace, saved_world: int, world: int, depth: int,
                       needs: frozenset) -> list[str]:
    """One line per flag that differs from the checkpoint's and would change the model, data or masks.

    ``needs`` is the strategy's: the attention flags count only for strategies that read attention.
    """
    new = _jsonable_args(args)
    names = [*_MUST_MATCH, *_STRATEGY_OPTIONS.get(args.mask, ())]
    if args.data is not None or saved.get("data") is not None:
        names.remove("dataset_length")  # unused with an image folder
    if needs & {"attn", "cls_attn"}:
        names.append("attn_source")
        if args.attn_source == "ema" or saved.get("attn_source") == "ema":
            names.append("ema_decay")
    if "attn" in needs:
        names.append("attn_reduce")
    if saved:
        saved = {**_BEFORE_THE_FLAG, **saved}
    lines = []
    for name in names:
        if name in saved and not _same_value(name, saved[name], new[name]):
            lines.append(f"{_flag(name)}: saved {saved[name]}, now {new[name]}")
    if "attn" in needs and "attn_layers" in saved:
        was, now = (_resolve_attn_layers(v, depth) for v in (saved["attn_layers"], args.attn_layers))
        if was != now:
            lines.append(f"--attn-layers: saved {was}, now {now}")
    if saved_world != world:
        lines.append(f"processes (WORLD_SIZE): saved {saved_world}, now {world}")
    return lines


def _resolve_attn_layers(value: int | str | None, depth: int) -> int:
    """The number of blocks ``--attn-layers`` reads: half the depth by default, every block for 'all'."""
    if value is None:
        return depth // 2
    return depth if value == "all" else int(value)


def _same_value(name: str, saved, new) -> bool:
    if name == "data" and saved is not None and new is not None:
        return Path(saved).expanduser().resolve() == Path(new).expanduser().resolve()
    return saved == new


def _find_checkpoint(args: argparse.Namespace, out: Path, is_main: bool) -> tuple[Path, dict] | None:
    """The checkpoint ``--resume`` names (None: 'auto' found none); an unusable file stops the run."""
    if args.resume == "auto":
        found = latest_valid_checkpoint(out)
        if found is None and is_main:
            print(f"[evomask] --resume auto: no checkpoint in {out}, starting fresh", flush=True)
        return found
    path = Path(args.resume)
    try:
        return path, load_checkpoint(path)
    except (OSError, RuntimeError) as exc:
        raise TrainingStopped(f"--resume {args.resume}: {exc}") from exc


def _check_resume_args(path: Path, ckpt: dict, args: argparse.Namespace, world: int, depth: int,
                       strategy: MaskStrategy) -> dict:
    """Stops the run when the checkpoint was saved with flags that change the model, data or masks.

    Returns the checkpoint's saved arguments (empty for a checkpoint that did not store them).
    """
    saved = json.loads(ckpt["args"]) if isinstance(ckpt.get("args"), str) else {}
    saved_world = int(ckpt.get("world", len(ckpt.get("rng", [None]))))
    lines = _resume_mismatches(saved, args, saved_world, world, depth, strategy.needs)
    if lines:
        raise TrainingStopped(
            f"checkpoint {path} was saved with other flags, which would change the model, the data order or the "
            "masks; resume with the saved values or use another --output-dir:\n  " + "\n  ".join(lines)
        )
    return saved


def _apply_schedule(optimizer: torch.optim.Optimizer, scheduler, wanted: list[dict]) -> None:
    """Puts this command line's learning rate and weight decay (``wanted``, one dict per group) on
    an optimiser and scheduler loaded from a checkpoint, at the checkpoint's step.

    Loading restores the saved base learning rates; recomputing from the same values gives back
    bitwise the saved ones, so an unchanged command line resumes exactly.
    """
    for group, values in zip(optimizer.param_groups, wanted):
        group.update(values)
    scheduler.base_lrs = [values["initial_lr"] for values in wanted]
    scheduler.last_epoch -= 1
    with warnings.catch_warnings():  # a checkpoint of step 0 was never stepped: torch warns of the order
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()  # the lr of the resumed step under the (possibly new) schedule


def _schedule_note(saved: dict, args: argparse.Namespace, step: int, totals: tuple[int, int],
                   lrs: tuple[float, float]) -> str | None:
    """A line saying what resuming with other schedule flags does to the learning rate, or None."""
    changes = [f"{_flag(n)} {saved[n]} -> {getattr(args, n)}" for n in _SCHEDULE
               if n in saved and saved[n] != getattr(args, n)]
    if not changes:
        return None
    return (f"[evomask] resumed with {', '.join(changes)}: the warmup + cosine schedule is recomputed with the new "
            f"values over {totals[1]} steps (was {totals[0]}) and applies from step {step}, so the learning "
            f"rate goes from {lrs[0]:.3g} to {lrs[1]:.3g} there")


def _restore(found: tuple[Path, dict], args: argparse.Namespace, *, model: MaskedAutoencoder,
             optimizer: torch.optim.Optimizer, scheduler, strategy: MaskStrategy, generators: dict,
             rank: int, world: int, device: torch.device, steps_per_epoch: int,
             teacher: EMATeacher | None = None) -> int:
    """Loads a checkpoint into the run's objects after checking the flags it was saved with.

    The schedule flags of this command line apply from the checkpoint's step. Returns that step.
    """
    path, ckpt = found
    saved = _check_resume_args(path, ckpt, args, world, model.cfg.depth, strategy)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:  # a checkpoint that predates the saved flags, of another model
        first = str(exc).strip().splitlines()[0]
        raise TrainingStopped(f"checkpoint {path} does not fit --model {args.model} --img-size {args.img_size} "
                              f"--patch-size {args.patch_size}: {first}") from exc
    wanted = [{"initial_lr": g["initial_lr"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    saved_lr = optimizer.param_groups[0]["lr"]
    _apply_schedule(optimizer, scheduler, wanted)
    strategy.load_state_dict(ckpt.get("strategy", {}))
    if teacher is not None:
        if "ema" not in ckpt:
            raise TrainingStopped(f"checkpoint {path} holds no EMA model, which --attn-source ema needs: resume "
                                  "with --attn-source online or use another --output-dir")
        teacher.load_state_dict(ckpt["ema"])
    rng = ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0]
    _set_rng_state(rng, generators, device)
    step = int(ckpt["step"])
    if rank == 0:
        print(f"[evomask] resumed from step {step} (epoch {step / steps_per_epoch:.2f})", flush=True)
        totals = (int(saved.get("epochs", args.epochs)) * steps_per_epoch, args.epochs * steps_per_epoch)
        note = _schedule_note(saved, args, step, totals, (saved_lr, optimizer.param_groups[0]["lr"]))
        if note:
            print(note, flush=True)
    return step


# --------------------------------------------------------------------------------------------
# the loop


def train(args: argparse.Namespace) -> dict:
    """Runs pretraining as configured by ``args`` (see :func:`build_parser`); returns a summary.

    Raises :class:`TrainingStopped` (and its :class:`NonFiniteError`) when the run cannot go on;
    the checkpoints written before are untouched. With ``args.deterministic`` PyTorch's
    deterministic mode is on for the run and restored afterwards.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        torch.use_deterministic_algorithms(True)
    # SIGTERM (cluster pre-emption) behaves like Ctrl-C: a checkpoint once training runs, and the
    # output folder's lock is released however far start-up got.
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        with contextlib.ExitStack() as cleanup:
            return _train(args, cleanup)
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        torch.use_deterministic_algorithms(previous)


def _build_model(args: argparse.Namespace, device: torch.device) -> tuple[MaskedAutoencoder, int]:
    """The MAE of ``args`` and the number of encoder blocks the masks' attention averages."""
    try:
        model = build_mae(args.model, args.img_size, args.patch_size, args.norm_pix_loss).to(device)
    except ValueError as exc:  # e.g. an image size that is not a multiple of the patch size
        raise TrainingStopped(f"--img-size {args.img_size} / --patch-size {args.patch_size}: {exc}") from exc
    depth = model.cfg.depth
    attn_layers = _resolve_attn_layers(args.attn_layers, depth)
    if not 1 <= attn_layers <= depth:
        raise TrainingStopped(f"--attn-layers must be in [1, {depth}] for --model {args.model}, got {attn_layers}")
    _check_mask_ratio(args.mask_ratio, model.cfg.num_patches)
    return model, attn_layers


def _check_masking_flags(args: argparse.Namespace, needs: frozenset) -> None:
    """Refuses flags that would be silently ignored by the chosen ``--mask``."""
    reads_attention = bool(needs & {"attn", "cls_attn"})
    if args.attn_source != "online" and not reads_attention:
        raise TrainingStopped(f"--attn-source {args.attn_source} applies to the strategies that read attention "
                              f"(ehm, epm, attn), not to --mask {args.mask}")
    if args.attn_reduce != "mean" and "attn" not in needs:
        raise TrainingStopped(f"--attn-reduce {args.attn_reduce} applies to the strategies that read the patch "
                              f"attention (ehm, epm), not to --mask {args.mask}")
    if args.epm_variant != "paper" and args.mask != "epm":
        raise TrainingStopped(f"--epm-variant {args.epm_variant} applies to --mask epm, not to --mask {args.mask}")
    if args.epm_variant == "released":
        for name, default in (("gamma", 2.0), ("em_iters", 10)):
            if getattr(args, name) != default:
                raise TrainingStopped(
                    f"{_flag(name)} {getattr(args, name)} applies to --epm-variant paper only: the released code "
                    f"has its own alpha and clustering (leave {_flag(name)} at {default})")


def _build_masker(args: argparse.Namespace, model: MaskedAutoencoder, attn_layers: int,
                  rank: int) -> tuple[MaskStrategy, "StepMasker", EMATeacher | None]:
    """The strategy, the step masker (with its own generator) and the EMA teacher (or None)."""
    options = {
        "selective": {"steps": args.selective_steps, "probes": args.selective_probes},
        "epm": {"num_parts": args.num_parts, "gamma": args.gamma, "em_iters": args.em_iters,
                "variant": args.epm_variant},
    }.get(args.mask, {})
    _check_masking_flags(args, STRATEGIES[args.mask].needs)
    strategy = build_strategy(args.mask, args.mask_ratio, **options)
    teacher = EMATeacher(model, args.ema_decay) if args.attn_source == "ema" else None
    mask_gen = torch.Generator().manual_seed(args.seed * 1_000_003 + 17 + rank)
    masker = StepMasker(strategy, attn_layers, mask_gen, teacher=teacher, reduce=args.attn_reduce)
    return strategy, masker, teacher


def _build_data(args: argparse.Namespace, device: torch.device):
    """The dataset and the gallery's fixed images; a folder with nothing usable stops the run."""
    try:
        dataset = build_dataset(args.data, args.img_size, seed=args.seed, length=args.dataset_length)
        # Read now, so that a folder none of whose images decodes stops the run at start-up.
        gallery_batch = torch.stack([dataset[i] for i in range(min(args.gallery_images, len(dataset)))])
    except (OSError, ValueError, RuntimeError) as exc:  # missing, empty or unreadable folder
        raise TrainingStopped(f"--data {args.data}: {exc}") from exc
    return dataset, gallery_batch.to(device)


def _epochs_done(step: int, steps_per_epoch: int) -> int | float:
    """Epochs completed after ``step`` optimiser steps, to 4 decimals (an int at an epoch's end)."""
    epochs = round(step / steps_per_epoch, 4)
    return int(epochs) if epochs == int(epochs) else epochs


def _write_gallery(model: MaskedAutoencoder, masker: "StepMasker", batch: torch.Tensor, path: Path,
                   args: argparse.Namespace, *, step: int, steps_per_epoch: int, total_steps: int,
                   use_bf16: bool) -> None:
    """The mask gallery after ``step`` steps, masks drawn at the progress the next step trains with.

    Neither the mask generator nor the masker's progress is left changed: the training masks
    stay those of a run without galleries.
    """
    device = batch.device
    progress, masker.progress = masker.progress, step / total_steps
    gen_state = masker.generator.get_state()
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            _, pred, mask = model(batch, mask_fn=masker)
        title = (f"{args.mask} masks, epoch {_epochs_done(step, steps_per_epoch)} (step {step}), "
                 f"t/T = {masker.progress:.2f} ({args.model}, {args.img_size}px)")
        # The trees drawn are those the masks were cut from (an EMA teacher's, summed, ...) when the
        # strategy reads attention; otherwise the online encoder's own.
        save_gallery(model, batch, mask, pred, masker.attn_layers, path, title, progress=masker.progress,
                     similarity=masker.last_similarity)
    except OSError as exc:
        raise TrainingStopped(f"could not write the mask gallery {path} at step {step}: {exc}") from exc
    finally:
        masker.generator.set_state(gen_state)
        masker.progress = progress
        model.train()


class _KnnMonitor:
    """``--eval-every``: the encoder's k-NN top-1 on ``--eval-data`` every E epochs, on rank 0 only.

    The data is read at construction, so a bad ``--eval-data`` stops the run at start-up rather
    than after the first epochs. An evaluation draws from no generator and leaves the model's mode
    as it was, so the run's weights are those of a run without the monitor.
    """

    def __init__(self, args: argparse.Namespace, is_main: bool, device: torch.device, use_bf16: bool):
        self.every = args.eval_every if is_main else 0
        self.data, self.device = args.eval_data, device
        self.dtype = torch.bfloat16 if use_bf16 else None
        if self.every:
            from .evaluate import EvaluationStopped, load_eval_data

            try:
                load_eval_data(self.data, args.img_size, flag="--eval-data")
            except EvaluationStopped as exc:
                raise TrainingStopped(str(exc)) from exc

    def due(self, epochs_done: int) -> bool:
        """Whether the monitor runs after ``epochs_done`` completed epochs."""
        return bool(self.every) and epochs_done % self.every == 0

    def __call__(self, model: MaskedAutoencoder, log: "_MetricsLog", step: int, epoch, say) -> None:
        """Evaluates ``model``, logs ``knn_top1`` at ``step`` / ``epoch`` and prints one line with ``say``."""
        from .evaluate import EvaluationStopped, knn_monitor

        try:
            top1 = knn_monitor(model, self.data, self.device, autocast_dtype=self.dtype)
        except EvaluationStopped as exc:
            raise TrainingStopped(f"{exc} (k-NN monitor at step {step})") from exc
        _write_or_stop(log.write_eval, log.path, step, {"step": step, "epoch": epoch, "knn_top1": round(top1, 3)})
        say(f"[evomask] epoch {epoch}: k-NN top-1 {top1:.2f} % on {self.data}")


def _train(args: argparse.Namespace, cleanup: contextlib.ExitStack) -> dict:
    rank, world, device = _init_distributed(args.device)
    is_main = rank == 0
    out = Path(args.output_dir)
    if is_main:
        _hold_output_dir(out, cleanup)

    torch.manual_seed(args.seed)  # same initial weights on every rank
    model, attn_layers = _build_model(args, device)
    torch.manual_seed(args.seed + 1 + rank)

    dataset, gallery_batch = _build_data(args, device)
    use_bf16 = args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")
    monitor = _KnnMonitor(args, is_main, device, use_bf16)
    loader = build_loader(dataset, args.batch_size, args.seed, num_workers=args.num_workers,
                          distributed=world > 1, rank=rank, world_size=world)
    steps_per_epoch = len(loader) // args.accum_iter
    if steps_per_epoch == 0:
        raise TrainingStopped(
            f"the dataset ({len(dataset)} images) gives no full optimiser step per epoch with --batch-size "
            f"{args.batch_size} x --accum-iter {args.accum_iter} x {world} process(es)"
        )
    total_steps = args.epochs * steps_per_epoch
    eff_batch = args.batch_size * args.accum_iter * world
    lr = args.lr if args.lr is not None else args.blr * eff_batch / 256
    optimizer = torch.optim.AdamW(_param_groups(model, args.weight_decay), lr=lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _cosine_with_warmup(total_steps, round(args.warmup_epochs * steps_per_epoch), args.min_lr / lr)
    )

    strategy, masker, teacher = _build_masker(args, model, attn_layers, rank)
    generators = {"mask": masker.generator}

    step = 0
    found = _find_checkpoint(args, out, is_main) if args.resume else None
    if found is not None:
        step = _restore(found, args, model=model, optimizer=optimizer, scheduler=scheduler, strategy=strategy,
                        generators=generators, rank=rank, world=world, device=device,
                        steps_per_epoch=steps_per_epoch, teacher=teacher)

    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    try:
        log = _MetricsLog(out, step) if is_main else None
    except OSError as exc:
        raise TrainingStopped(f"could not write {out / 'metrics.csv'}: {exc}") from exc
    last_steps = min(total_steps, args.max_steps) if args.max_steps is not None else total_steps

    def checkpoint() -> None:
        rngs = [None] * world
        state = _rng_state(generators, device)
        if world > 1:
            dist.all_gather_object(rngs, state)
        else:
            rngs = [state]
        if is_main:
            path = out / f"checkpoint-{step:08d}.pt"
            try:
                save_atomic(
                    {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "strategy": strategy.state_dict(), "step": step,
                     "epoch": step / steps_per_epoch, "rng": rngs, "world": world,
                     "args": json.dumps(_jsonable_args(args)),
                     **({"ema": teacher.state_dict()} if teacher is not None else {})},
                    path,
                )
            except OSError as exc:  # disk full, quota, folder gone: the older checkpoints are untouched
                kept = list_checkpoints(out)
                raise TrainingStopped(
                    f"could not write checkpoint {path} at step {step}: {exc}. "
                    + (f"The newest intact checkpoint is {kept[0]}." if kept else "No earlier checkpoint exists.")
                ) from exc
            prune_checkpoints(out, args.keep_checkpoints)

    def gallery(name: int) -> None:
        if is_main:
            _write_gallery(model, masker, gallery_batch, out / "gallery" / f"epoch{name:04d}.png", args,
                           step=step, steps_per_epoch=steps_per_epoch, total_steps=total_steps, use_bf16=use_bf16)

    from tqdm.auto import tqdm

    model.train()
    start_epoch, skip = divmod(step, steps_per_epoch)
    bar = tqdm(total=last_steps, initial=step, disable=not is_main, desc=f"pretrain {args.mask}", dynamic_ncols=True)
    last_loss = float("nan")
    interrupted = False
    try:
        for epoch in range(start_epoch, args.epochs):
            if step >= last_steps:
                break
            batches = iter(_epoch_loader(loader, epoch, skip * args.accum_iter))
            for _ in range(steps_per_epoch - skip):
                if step >= last_steps:
                    break
                t0 = time.perf_counter()
                masker.progress = step / total_steps  # t / T, the epoch fraction
                masker.step = step
                mask_ms, loss_sum = 0.0, 0.0
                for micro in range(args.accum_iter):
                    imgs = next(batches).to(device, non_blocking=True)
                    sync = micro == args.accum_iter - 1 or world == 1
                    ctx = ddp_model.no_sync() if not sync else torch.enable_grad()
                    with ctx, torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                        loss, _, _ = ddp_model(imgs, mask_fn=masker)
                    if not torch.isfinite(loss):
                        raise NonFiniteError(
                            f"the loss is {loss.item()} at step {step} (epoch {_epochs_done(step, steps_per_epoch)}): the model has diverged and "
                            "the step was not taken. Resume from the last checkpoint with a lower learning "
                            "rate (--blr) or more warmup."
                        )
                    (loss / args.accum_iter).backward()
                    mask_ms += masker.last_ms
                    loss_sum += loss.item()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))  # measures only
                if not torch.isfinite(grad_norm):
                    raise NonFiniteError(
                        f"the gradient norm is {grad_norm.item()} at step {step} (epoch {_epochs_done(step, steps_per_epoch)}): the step was not "
                        "taken. Resume from the last checkpoint with a lower learning rate (--blr)."
                    )
                optimizer.step()
                if teacher is not None:
                    teacher.update(model)
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                last_loss = loss_sum / args.accum_iter
                step_ms = (time.perf_counter() - t0) * 1e3
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", mask_ms=f"{mask_ms:.1f}")
                if is_main and (step % args.log_every == 0 or step == last_steps):
                    _write_or_stop(log.write, log.path, step, {
                        "step": step, "epoch": _epochs_done(step, steps_per_epoch), "progress": round(step / total_steps, 6), "loss": last_loss,
                        "lr": scheduler.get_last_lr()[0], "mask_ms": round(mask_ms, 3), "step_ms": round(step_ms, 3),
                        "images_per_s": round(eff_batch / (step_ms / 1e3), 2)})
                if step % args.save_every == 0:
                    checkpoint()
            skip = 0
            epoch_done = step % steps_per_epoch == 0
            if epoch_done and step % args.save_every != 0:
                checkpoint()
            if epoch_done and (step // steps_per_epoch) % args.gallery_every == 0:
                gallery(step // steps_per_epoch)
            if epoch_done and monitor.due(step // steps_per_epoch):
                monitor(model, log, step, _epochs_done(step, steps_per_epoch), bar.write)
    except KeyboardInterrupt:
        interrupted = True
        if is_main:
            print(f"\n[evomask] interrupted at step {step}: writing a checkpoint", flush=True)
        checkpoint()
    finally:
        bar.close()
        if log is not None:
            log.close()
    if not interrupted:
        if step % args.save_every != 0 and step % steps_per_epoch != 0:
            checkpoint()
        gallery(math.ceil(step / steps_per_epoch))
    summary = {"step": step, "loss": last_loss, "interrupted": interrupted, "output_dir": str(out),
               "kernels": evomask_ext.kernel_sources()["hier_mask"]}
    if world > 1:
        dist.destroy_process_group()
    if interrupted:
        raise SystemExit(130)
    return summary


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        summary = train(args)
    except TrainingStopped as exc:
        print(f"[evomask] stopped: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(3) from None
    except KeyboardInterrupt:  # before the first step: there is nothing to checkpoint yet
        print("\n[evomask] interrupted before training started (or while stopping): no new checkpoint",
              file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[evomask] done: {json.dumps(summary)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
