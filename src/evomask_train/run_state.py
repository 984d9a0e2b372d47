"""The state of a pretraining run beside its checkpoints: the output folder it holds, every RNG,
the metrics log, and what a checkpoint saves and a resume restores (and refuses).

A checkpoint holds the model, optimiser, scheduler, the masking strategy's state, the EMA teacher
(``--attn-source ema``), the step, every process's RNG states and the command line's flags, so a
resumed run continues bit for bit. :func:`restore` refuses a checkpoint saved with flags that
shape the model, the data order or the masks (one line per flag), and applies this command line's
schedule flags from the checkpoint's step.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import warnings
import math
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import torch
import torch.distributed as dist

from torch.utils.data import DataLoader

from .checkpoint import latest_valid_checkpoint, list_checkpoints, load_checkpoint, prune_checkpoints, save_atomic
from .ema import EMATeacher
from .errors import TrainingStopped
from .mask_fn import ModelMasks
from .model import MaskedAutoencoder
from .run_lock import FolderBusy, RunLock

__all__ = ["Run", "MetricsLog", "hold_output_dir", "find_checkpoint", "restore", "save_checkpoint",
           "resolve_attn_layers", "flag", "MUST_MATCH"]


@dataclass
class Run:
    """Everything one pretraining run holds, built once by :func:`evomask_train.train.train`."""

    args: argparse.Namespace
    out: Path
    rank: int
    world: int
    device: torch.device
    model: MaskedAutoencoder  #: the model itself (checkpoints, galleries, the monitor)
    ddp_model: torch.nn.Module  #: what the step runs: ``model``, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    masks: ModelMasks
    teacher: EMATeacher | None
    loader: DataLoader
    gallery_batch: torch.Tensor
    monitor: Any  #: the k-NN monitor (``evomask_train.engine.KnnMonitor``)
    steps_per_epoch: int
    total_steps: int  #: T of the schedule: --epochs x steps per epoch
    last_steps: int  #: where this invocation stops (--max-steps, else T)
    eff_batch: int
    use_bf16: bool
    log: MetricsLog | None = None  #: rank 0 only
    step: int = 0  #: optimiser steps taken
    last_loss: float = math.nan
    last_mask_ms: float = 0.0  #: the last step's masking time (attention pass + mask op)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def generators(self) -> dict[str, torch.Generator]:
        """The run's own generators, checkpointed with torch's global RNG states."""
        return {"mask": self.masks.masker.generator}

    def epochs_done(self) -> int | float:
        """Epochs completed after ``step`` optimiser steps, to 4 decimals (an int at an epoch's end)."""
        epochs = round(self.step / self.steps_per_epoch, 4)
        return int(epochs) if epochs == int(epochs) else epochs

class MetricsLog:
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


def rng_state(generators: dict[str, torch.Generator], device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), **{k: g.get_state() for k, g in generators.items()}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, generators: dict[str, torch.Generator], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    for key, gen in generators.items():
        gen.set_state(state[key])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def write_or_stop(write, path: Path, step: int, row: dict) -> None:
    try:
        write(row)
    except OSError as exc:
        raise TrainingStopped(f"could not write {path} at step {step}: {exc}") from exc


def _remove_partial_checkpoints(folder: Path) -> None:
    """Deletes the temporary files of checkpoint writes that a kill interrupted (never a checkpoint)."""
    for partial in folder.glob(".checkpoint-*.pt.*.tmp"):
        print(f"[evomask] removing {partial.name}, left by a checkpoint write that was interrupted", flush=True)
        partial.unlink(missing_ok=True)


def jsonable_args(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def hold_output_dir(out: Path, cleanup: contextlib.ExitStack) -> None:
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


#: Flags a resumed run must share with its checkpoint: they shape the model, the data or the masks.
MUST_MATCH = ("model", "img_size", "patch_size", "norm_pix_loss", "data", "dataset_length", "batch_size",
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
    new = jsonable_args(args)
    names = [*MUST_MATCH, *_STRATEGY_OPTIONS.get(args.mask, ())]
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
            lines.append(f"{flag(name)}: saved {saved[name]}, now {new[name]}")
    if "attn" in needs and "attn_layers" in saved:
        was, now = (resolve_attn_layers(v, depth) for v in (saved["attn_layers"], args.attn_layers))
        if was != now:
            lines.append(f"--attn-layers: saved {was}, now {now}")
    if saved_world != world:
        lines.append(f"processes (WORLD_SIZE): saved {saved_world}, now {world}")
    return lines


def resolve_attn_layers(value: int | str | None, depth: int) -> int:
    """The number of blocks ``--attn-layers`` reads: half the depth by default, every block for 'all'."""
    if value is None:
        return depth // 2
    return depth if value == "all" else int(value)


def _same_value(name: str, saved, new) -> bool:
    if name == "data" and saved is not None and new is not None:
        return Path(saved).expanduser().resolve() == Path(new).expanduser().resolve()
    return saved == new


def find_checkpoint(args: argparse.Namespace, out: Path, is_main: bool) -> tuple[Path, dict] | None:
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
                       needs: frozenset) -> dict:
    """Stops the run when the checkpoint was saved with flags that change the model, data or masks.

    Returns the checkpoint's saved arguments (empty for a checkpoint that did not store them).
    """
    saved = json.loads(ckpt["args"]) if isinstance(ckpt.get("args"), str) else {}
    saved_world = int(ckpt.get("world", len(ckpt.get("rng", [None]))))
    lines = _resume_mismatches(saved, args, saved_world, world, depth, needs)
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
    changes = [f"{flag(n)} {saved[n]} -> {getattr(args, n)}" for n in _SCHEDULE
               if n in saved and saved[n] != getattr(args, n)]
    if not changes:
        return None
    return (f"[evomask] resumed with {', '.join(changes)}: the warmup + cosine schedule is recomputed with the new "
            f"values over {totals[1]} steps (was {totals[0]}) and applies from step {step}, so the learning "
            f"rate goes from {lrs[0]:.3g} to {lrs[1]:.3g} there")


def restore(run: Run, found: tuple[Path, dict]) -> None:
    """Loads a checkpoint into ``run`` after checking the flags it was saved with; sets ``run.step``.

    The schedule flags of this command line apply from the checkpoint's step.
    """
    path, ckpt = found
    args, model, optimizer, scheduler = run.args, run.model, run.optimizer, run.scheduler
    strategy = run.masks.masker.strategy
    saved = _check_resume_args(path, ckpt, args, run.world, model.cfg.depth, strategy.needs)
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
    if run.teacher is not None:
        if "ema" not in ckpt:
            raise TrainingStopped(f"checkpoint {path} holds no EMA model, which --attn-source ema needs: resume "
                                  "with --attn-source online or use another --output-dir")
        run.teacher.load_state_dict(ckpt["ema"])
    rng = ckpt["rng"][run.rank] if run.rank < len(ckpt["rng"]) else ckpt["rng"][0]
    set_rng_state(rng, run.generators, run.device)
    run.step = step = int(ckpt["step"])
    if run.is_main:
        print(f"[evomask] resumed from step {step} (epoch {step / run.steps_per_epoch:.2f})", flush=True)
        totals = (int(saved.get("epochs", args.epochs)) * run.steps_per_epoch, run.total_steps)
        note = _schedule_note(saved, args, step, totals, (saved_lr, optimizer.param_groups[0]["lr"]))
        if note:
            print(note, flush=True)


def save_checkpoint(run: Run) -> None:
    """Writes ``checkpoint-<step>.pt`` atomically (rank 0; every rank contributes its RNG states) and
    prunes the older step checkpoints to ``--keep-checkpoints``. An unwritable file stops the run,
    naming the newest intact checkpoint."""
    state = rng_state(run.generators, run.device)
    rngs = [state]
    if run.world > 1:
        rngs = [None] * run.world
        dist.all_gather_object(rngs, state)
    if not run.is_main:
        return
    path = run.out / f"checkpoint-{run.step:08d}.pt"
    try:
        save_atomic(
            {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(), "strategy": run.masks.masker.strategy.state_dict(),
             "step": run.step, "epoch": run.step / run.steps_per_epoch, "rng": rngs, "world": run.world,
             "args": json.dumps(jsonable_args(run.args)),
             **({"ema": run.teacher.state_dict()} if run.teacher is not None else {})},
            path,
        )
    except OSError as exc:  # disk full, quota, folder gone: the older checkpoints are untouched
        kept = list_checkpoints(run.out)
        raise TrainingStopped(
            f"could not write checkpoint {path} at step {run.step}: {exc}. "
            + (f"The newest intact checkpoint is {kept[0]}." if kept else "No earlier checkpoint exists.")
        ) from exc
    prune_checkpoints(run.out, run.args.keep_checkpoints)
