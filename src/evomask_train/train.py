"""evomask-pretrain: MAE pretraining whose mask of every step comes from ``torch.ops.evomask``.

A thin loop in the spirit of MAE's ``main_pretrain.py``: this module is the command line and the
set-up; :mod:`evomask_train.engine` runs the epochs, :mod:`evomask_train.run_state` holds the
run's checkpoints, RNG states and metrics log, :mod:`evomask_train.mask_fn` draws each step's
mask through the public :class:`evomask_ext.EvolvedMasker`.

AdamW (0.9, 0.95), cosine schedule with warmup, bf16 autocast on CUDA, gradient accumulation, DDP
under ``torchrun``, atomic checkpoints with every RNG state (so a resumed run continues bit for
bit), a tqdm bar, ``metrics.csv`` plus TensorBoard, and mask galleries. A run holds its output
folder (a lock file, see :mod:`evomask_train.run_lock`) and resumes only a checkpoint saved with
the same model, data and mask flags. Every early end is a :class:`TrainingStopped`
(:mod:`evomask_train.errors`): ``main`` prints it in one line and exits 3 (130 when interrupted).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import evomask_ext
from evomask_ext import EvolvedMasker
from evomask_ext._checks import largest_keeping_ratio, smallest_masking_ratio
from evomask_ext.masking import STRATEGIES

from .data import build_dataset, build_loader
from .devices import parse_device
from .flags import nonnegative_float, nonnegative_int, open_unit_float, positive_float, positive_int
from .ema import EMATeacher
from .engine import KnnMonitor, end_of_epoch, train_one_epoch, write_gallery
from .errors import NonFiniteError, TrainingInterrupted, TrainingStopped
from .mask_fn import ModelMasks
from .model import MODEL_SIZES, MaskedAutoencoder, build_mae
from .run_state import (
    MUST_MATCH,
    MetricsLog,
    Run,
    find_checkpoint,
    flag,
    hold_output_dir,
    resolve_attn_layers,
    restore,
    save_checkpoint,
)

__all__ = ["build_parser", "main", "train", "TrainingStopped", "NonFiniteError", "TrainingInterrupted"]


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


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, default=None,
                   help="ImageFolder-style folder of images (labels unused); default: the embedded scikit-image photos")
    g.add_argument("--dataset-length", type=positive_int, default=1024,
                   help="samples per epoch of the embedded default dataset (random crops)")
    g.add_argument("--num-workers", type=nonnegative_int, default=0, help="DataLoader worker processes")


def _add_evaluation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=nonnegative_int, default=0,
                   help="k-NN top-1 of the encoder on --eval-data every this many epochs (0: off): metrics.csv "
                        "column knn_top1, TensorBoard eval/knn_top1")
    g.add_argument("--eval-data", default="digits",
                   help="labelled data of --eval-every: 'digits' (embedded, scikit-learn) or a folder with train/ "
                        "and val/ ImageFolder trees")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=sorted(MODEL_SIZES), default="tiny", help="ViT encoder size (MAE decoder scaled with it)")
    g.add_argument("--img-size", type=positive_int, default=224, help="input resolution in pixels")
    g.add_argument("--patch-size", type=positive_int, default=16, help="patch side in pixels")
    g.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="regress per-patch normalised pixels (MAE's best setting)")


def _add_masking_flags(p: argparse.ArgumentParser) -> None:
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


def _add_optimisation_flags(p: argparse.ArgumentParser) -> None:
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


def _add_run_flags(p: argparse.ArgumentParser) -> None:
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
                        f"differs from the checkpoint's: {', '.join(flag(d) for d in MUST_MATCH)}, the number "
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


def build_parser() -> argparse.ArgumentParser:
    """The ``evomask-pretrain`` argument parser."""
    p = argparse.ArgumentParser(
        prog="evomask-pretrain",
        description="MAE pretraining with evolved masks (EHM/EPM) or the baselines, masks from torch.ops.evomask.",
        formatter_class=_HelpFormatter,
    )
    _add_data_flags(p)
    _add_evaluation_flags(p)
    _add_model_flags(p)
    _add_masking_flags(p)
    _add_optimisation_flags(p)
    _add_run_flags(p)
    return p


# --------------------------------------------------------------------------------------------
# set-up


def _init_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    parse_device(device_arg, TrainingStopped)
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


def _build_model(args: argparse.Namespace, device: torch.device) -> tuple[MaskedAutoencoder, int]:
    """The MAE of ``args`` and the number of encoder blocks the masks' attention averages."""
    try:
        model = build_mae(args.model, args.img_size, args.patch_size, args.norm_pix_loss).to(device)
    except ValueError as exc:  # e.g. an image size that is not a multiple of the patch size
        raise TrainingStopped(f"--img-size {args.img_size} / --patch-size {args.patch_size}: {exc}") from exc
    depth = model.cfg.depth
    attn_layers = resolve_attn_layers(args.attn_layers, depth)
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
                    f"{flag(name)} {getattr(args, name)} applies to --epm-variant paper only: the released code "
                    f"has its own alpha and clustering (leave {flag(name)} at {default})")


def _build_masks(args: argparse.Namespace, model: MaskedAutoencoder, attn_layers: int,
                 rank: int) -> tuple[ModelMasks, EMATeacher | None]:
    """The step's mask function around an :class:`evomask_ext.EvolvedMasker` (its own generator,
    seeded per process) and the EMA teacher (or None)."""
    options = {
        "selective": {"steps": args.selective_steps, "probes": args.selective_probes},
        "epm": {"num_parts": args.num_parts, "gamma": args.gamma, "em_iters": args.em_iters,
                "variant": args.epm_variant},
    }.get(args.mask, {})
    _check_masking_flags(args, STRATEGIES[args.mask].needs)
    masker = EvolvedMasker(args.mask, args.mask_ratio, seed=args.seed * 1_000_003 + 17 + rank,
                           grid=model.cfg.grid, **options)
    teacher = EMATeacher(model, args.ema_decay) if args.attn_source == "ema" else None
    return ModelMasks(masker, attn_layers, teacher=teacher, reduce=args.attn_reduce), teacher


def _build_data(args: argparse.Namespace, device: torch.device):
    """The dataset and the gallery's fixed images; a folder with nothing usable stops the run."""
    try:
        dataset = build_dataset(args.data, args.img_size, seed=args.seed, length=args.dataset_length)
        # Read now, so that a folder none of whose images decodes stops the run at start-up.
        gallery_batch = torch.stack([dataset[i] for i in range(min(args.gallery_images, len(dataset)))])
    except (OSError, ValueError, RuntimeError) as exc:  # missing, empty or unreadable folder
        raise TrainingStopped(f"--data {args.data}: {exc}") from exc
    return dataset, gallery_batch.to(device)


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _optimiser(args: argparse.Namespace, model: MaskedAutoencoder, steps_per_epoch: int, eff_batch: int):
    """AdamW (MAE's betas, no decay on biases/norms/tokens) and its warmup + cosine schedule."""
    total_steps = args.epochs * steps_per_epoch
    lr = args.lr if args.lr is not None else args.blr * eff_batch / 256
    optimizer = torch.optim.AdamW(_param_groups(model, args.weight_decay), lr=lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _cosine_with_warmup(total_steps, round(args.warmup_epochs * steps_per_epoch), args.min_lr / lr)
    )
    return optimizer, scheduler


def _set_up(args: argparse.Namespace, cleanup: contextlib.ExitStack) -> Run:
    """Every object of the run, resumed from ``--resume`` if given; start-up faults stop it here."""
    rank, world, device = _init_distributed(args.device)
    if world > 1:
        cleanup.callback(dist.destroy_process_group)
    out = Path(args.output_dir)
    if rank == 0:
        hold_output_dir(out, cleanup)
    torch.manual_seed(args.seed)  # same initial weights on every rank
    model, attn_layers = _build_model(args, device)
    torch.manual_seed(args.seed + 1 + rank)
    dataset, gallery_batch = _build_data(args, device)
    use_bf16 = args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")
    monitor = KnnMonitor(args, rank == 0, device, use_bf16)
    loader = build_loader(dataset, args.batch_size, args.seed, num_workers=args.num_workers,
                          distributed=world > 1, rank=rank, world_size=world)
    steps_per_epoch = len(loader) // args.accum_iter
    if steps_per_epoch == 0:
        raise TrainingStopped(
            f"the dataset ({len(dataset)} images) gives no full optimiser step per epoch with --batch-size "
            f"{args.batch_size} x --accum-iter {args.accum_iter} x {world} process(es)"
        )
    eff_batch = args.batch_size * args.accum_iter * world
    optimizer, scheduler = _optimiser(args, model, steps_per_epoch, eff_batch)
    masks, teacher = _build_masks(args, model, attn_layers, rank)
    total_steps = args.epochs * steps_per_epoch
    masks.total_steps = total_steps
    run = Run(args=args, out=out, rank=rank, world=world, device=device, model=model, ddp_model=model,
              optimizer=optimizer, scheduler=scheduler, masks=masks, teacher=teacher, loader=loader,
              gallery_batch=gallery_batch, monitor=monitor, steps_per_epoch=steps_per_epoch,
              total_steps=total_steps, eff_batch=eff_batch, use_bf16=use_bf16,
              last_steps=min(total_steps, args.max_steps) if args.max_steps is not None else total_steps)
    found = find_checkpoint(args, out, rank == 0) if args.resume else None
    if found is not None:
        restore(run, found)
    if world > 1:
        run.ddp_model = torch.nn.parallel.DistributedDataParallel(model)
    if rank == 0:
        try:
            run.log = MetricsLog(out, run.step)
        except OSError as exc:
            raise TrainingStopped(f"could not write {out / 'metrics.csv'}: {exc}") from exc
        cleanup.callback(run.log.close)
    return run


# --------------------------------------------------------------------------------------------
# the run


def _fit(run: Run) -> None:
    """The epochs from ``run.step`` to ``run.last_steps``; Ctrl-C / SIGTERM writes a checkpoint and
    stops the run as :class:`TrainingInterrupted`."""
    from tqdm.auto import tqdm

    args = run.args
    run.model.train()
    start_epoch, skip = divmod(run.step, run.steps_per_epoch)
    with tqdm(total=run.last_steps, initial=run.step, disable=not run.is_main, desc=f"pretrain {args.mask}",
              dynamic_ncols=True) as bar:
        try:
            for epoch in range(start_epoch, args.epochs):
                if run.step >= run.last_steps:
                    break
                train_one_epoch(run, epoch, skip, bar)
                skip = 0
                end_of_epoch(run, bar)
        except KeyboardInterrupt:
            if run.is_main:
                print(f"\n[evomask] interrupted at step {run.step}: writing a checkpoint", flush=True)
            save_checkpoint(run)
            raise TrainingInterrupted(f"interrupted at step {run.step}; its checkpoint is written, continue with "
                                      "--resume auto") from None
    if run.step % args.save_every != 0 and run.step % run.steps_per_epoch != 0:
        save_checkpoint(run)
    write_gallery(run, math.ceil(run.step / run.steps_per_epoch))


def train(args: argparse.Namespace) -> dict:
    """Runs pretraining as configured by ``args`` (see :func:`build_parser`); returns a summary.

    Every early end raises :class:`TrainingStopped`: a fault it can explain, NaN/Inf
    (:class:`NonFiniteError`), or Ctrl-C / SIGTERM (:class:`TrainingInterrupted`, after a
    checkpoint once training runs); the checkpoints written before are untouched. With
    ``args.deterministic`` PyTorch's deterministic mode is on for the run and restored afterwards.
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
            run = _set_up(args, cleanup)
            _fit(run)
        return {"step": run.step, "loss": run.last_loss, "interrupted": False, "output_dir": str(run.out),
                "kernels": evomask_ext.kernel_sources()["hier_mask"]}
    except KeyboardInterrupt:  # in start-up, or a second one while the interrupted run was stopping
        raise TrainingInterrupted("interrupted before training started (or while stopping): no new checkpoint") from None
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        torch.use_deterministic_algorithms(previous)


def main(argv: list[str] | None = None) -> None:
    """``evomask-pretrain``: parses ``argv`` and trains; an early end prints one line and exits with
    its status (3 for a fault, 130 when interrupted)."""
    args = build_parser().parse_args(argv)
    try:
        summary = train(args)
    except TrainingStopped as exc:
        print(f"[evomask] stopped: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(exc.exit_code) from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[evomask] done: {json.dumps(summary)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
