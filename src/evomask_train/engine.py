"""One epoch of MAE pretraining with evolved masks, in the shape of MAE's ``engine_pretrain.py``,
and what runs between epochs: the mask gallery and the k-NN monitor.

A step: for each micro-batch (``--accum-iter``), the model embeds the images, :class:`ModelMasks`
draws the mask from the model's attention, the encoder sees the visible patches, the decoder
reconstructs; NaN/Inf loss or gradients stop the run before the optimiser steps. Then AdamW, the
EMA teacher's update, the scheduler, and the metrics row.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader

from .data import set_loader_epoch
from .errors import NonFiniteError, TrainingStopped
from .evaluate import EvaluationStopped, knn_monitor, load_eval_data
from .gallery import save_gallery
from .model import MaskedAutoencoder
from .run_state import MetricsLog, Run, save_checkpoint, write_or_stop

__all__ = ["train_one_epoch", "end_of_epoch", "write_gallery", "KnnMonitor"]


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


def _diverged(what: str, value: torch.Tensor, run: Run, advice: str) -> NonFiniteError:
    return NonFiniteError(f"{what} {value.item()} at step {run.step} (epoch {run.epochs_done()}): {advice}")


def train_step(run: Run, batches) -> float:
    """One optimiser step over ``--accum-iter`` micro-batches from ``batches``; returns the mean loss."""
    args, masks = run.args, run.masks
    masks.step = run.step
    mask_ms, loss_sum = 0.0, 0.0
    for micro in range(args.accum_iter):
        imgs = next(batches).to(run.device, non_blocking=True)
        sync = micro == args.accum_iter - 1 or run.world == 1
        ctx = run.ddp_model.no_sync() if not sync else torch.enable_grad()
        with ctx, torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.use_bf16):
            loss, _, _ = run.ddp_model(imgs, mask_fn=masks)
        if not torch.isfinite(loss):
            raise _diverged("the loss is", loss, run, "the model has diverged and the step was not taken. Resume "
                            "from the last checkpoint with a lower learning rate (--blr) or more warmup.")
        (loss / args.accum_iter).backward()
        mask_ms += masks.last_ms
        loss_sum += loss.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), float("inf"))  # measures only
    if not torch.isfinite(grad_norm):
        raise _diverged("the gradient norm is", grad_norm, run, "the step was not taken. Resume from the last "
                        "checkpoint with a lower learning rate (--blr).")
    run.optimizer.step()
    if run.teacher is not None:
        run.teacher.update(run.model)
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.step += 1
    run.last_mask_ms = mask_ms
    return loss_sum / args.accum_iter


def train_one_epoch(run: Run, epoch: int, skip: int, bar) -> None:
    """The optimiser steps of ``epoch`` after its first ``skip`` (a resumed run), until the epoch or
    ``--max-steps`` ends; a checkpoint every ``--save-every`` steps, a metrics row every ``--log-every``."""
    args = run.args
    batches = iter(_epoch_loader(run.loader, epoch, skip * args.accum_iter))
    for _ in range(run.steps_per_epoch - skip):
        if run.step >= run.last_steps:
            break
        started = time.perf_counter()
        run.last_loss = train_step(run, batches)
        step_ms = (time.perf_counter() - started) * 1e3
        lr = run.scheduler.get_last_lr()[0]
        bar.update(1)
        bar.set_postfix(loss=f"{run.last_loss:.4f}", lr=f"{lr:.2e}", mask_ms=f"{run.last_mask_ms:.1f}")
        if run.is_main and (run.step % args.log_every == 0 or run.step == run.last_steps):
            write_or_stop(run.log.write, run.log.path, run.step, {
                "step": run.step, "epoch": run.epochs_done(), "progress": round(run.step / run.total_steps, 6),
                "loss": run.last_loss, "lr": lr, "mask_ms": round(run.last_mask_ms, 3),
                "step_ms": round(step_ms, 3), "images_per_s": round(run.eff_batch / (step_ms / 1e3), 2)})
        if run.step % args.save_every == 0:
            save_checkpoint(run)


def end_of_epoch(run: Run, bar) -> None:
    """After a completed epoch: its checkpoint (unless one was just written), the gallery every
    ``--gallery-every`` epochs, the k-NN monitor every ``--eval-every``."""
    if run.step % run.steps_per_epoch != 0:
        return
    epochs = run.step // run.steps_per_epoch
    if run.step % run.args.save_every != 0:
        save_checkpoint(run)
    if epochs % run.args.gallery_every == 0:
        write_gallery(run, epochs)
    if run.monitor.due(epochs):
        run.monitor(run.model, run.log, run.step, run.epochs_done(), bar.write)


def write_gallery(run: Run, name: int) -> None:
    """``gallery/epoch<name>.png`` (rank 0) after ``run.step`` steps, masks drawn at the progress the
    next step trains with.

    Neither the mask generator nor the step of the masks is left changed: the training masks stay
    those of a run without galleries.
    """
    if not run.is_main:
        return
    args, model, masks = run.args, run.model, run.masks
    path = run.out / "gallery" / f"epoch{name:04d}.png"
    masker = masks.masker
    saved = masks.step, masker.generator.get_state(), masker.calls
    masks.step = run.step
    progress = masker.progress(run.step, run.total_steps)
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.use_bf16):
            _, pred, mask = model(run.gallery_batch, mask_fn=masks)
        title = (f"{args.mask} masks, epoch {run.epochs_done()} (step {run.step}), "
                 f"t/T = {progress:.2f} ({args.model}, {args.img_size}px)")
        # The trees drawn are those the masks were cut from (an EMA teacher's, summed, ...) when the
        # strategy reads attention; otherwise the online encoder's own.
        save_gallery(model, run.gallery_batch, mask, pred, masks.attn_layers, path, title, progress=progress,
                     similarity=masks.last_similarity)
    except OSError as exc:
        raise TrainingStopped(f"could not write the mask gallery {path} at step {run.step}: {exc}") from exc
    finally:
        masks.step = saved[0]
        masker.generator.set_state(saved[1])
        masker.calls = saved[2]
        model.train()


class KnnMonitor:
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
            try:
                load_eval_data(self.data, args.img_size, flag="--eval-data")
            except EvaluationStopped as exc:
                raise TrainingStopped(str(exc)) from exc

    def due(self, epochs_done: int) -> bool:
        """Whether the monitor runs after ``epochs_done`` completed epochs."""
        return bool(self.every) and epochs_done % self.every == 0

    def __call__(self, model: MaskedAutoencoder, log: MetricsLog, step: int, epoch, say) -> None:
        """Evaluates ``model``, logs ``knn_top1`` at ``step`` / ``epoch`` and prints one line with ``say``."""
        try:
            top1 = knn_monitor(model, self.data, self.device, autocast_dtype=self.dtype)
        except EvaluationStopped as exc:
            raise TrainingStopped(f"{exc} (k-NN monitor at step {step})") from exc
        write_or_stop(log.write_eval, log.path, step, {"step": step, "epoch": epoch, "knn_top1": round(top1, 3)})
        say(f"[evomask] epoch {epoch}: k-NN top-1 {top1:.2f} % on {self.data}")
