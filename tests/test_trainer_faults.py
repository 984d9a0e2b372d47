"""The trainer under faults: kills, interrupted and corrupt checkpoints, divergence, vanishing or
corrupt images, a full disk, and repeatability from a seed."""

from __future__ import annotations

import errno
import re
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evomask_ext.masker as masker_module
import evomask_train.checkpoint as checkpoint_module
import evomask_train.engine as engine_module
import evomask_train.mask_fn as mask_fn_module
import evomask_train.run_state as run_state_module
import evomask_train.train as train_module
from evomask_train.checkpoint import list_checkpoints, load_checkpoint
from evomask_train.data import CorruptImageWarning
from evomask_train.train import NonFiniteError, TrainingStopped, build_parser, main, train

# 32 px images in 8 px patches (N = 16): 8 steps per epoch of 32 images, well under a second each.
TINY = ["--model", "tiny", "--img-size", "32", "--patch-size", "8", "--batch-size", "4", "--dataset-length", "32",
        "--device", "cpu", "--warmup-epochs", "1", "--gallery-images", "2", "--gallery-every", "100",
        "--log-every", "1"]


def run(out: Path, *extra: str) -> dict:
    return train(build_parser().parse_args([*TINY, "--output-dir", str(out), *extra]))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def metric_steps(out: Path) -> list[int]:
    lines = (out / "metrics.csv").read_text().strip().splitlines()[1:]
    return [int(line.split(",")[0]) for line in lines]


def subprocess_env() -> dict:
    # The same intra-op thread count as this process: CPU reductions are bitwise repeatable only then.
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


# --------------------------------------------------------------------------------------------
# kills


def test_sigkill_mid_epoch_then_resume_loses_only_the_steps_since_the_checkpoint(tmp_path):
    """SIGKILL right after a checkpoint lands; --resume auto continues from the newest one and ends
    bitwise where an uninterrupted run ends."""
    out = tmp_path / "killed"
    common = ["--mask", "ehm", "--epochs", "6", "--save-every", "2", "--keep-checkpoints", "3", "--seed", "5"]
    cmd = [sys.executable, "-m", "evomask_train.train", *TINY, *common, "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint-00000004.pt").exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    saved = [int(p.name[11:19]) for p in list_checkpoints(out)]
    newest = max(saved)
    assert 4 <= newest < 48, f"killed after step 4 was checkpointed, found {saved}"
    logged = metric_steps(out)
    assert logged[: newest] == list(range(1, newest + 1))  # nothing up to the checkpoint was lost

    end = newest + 3  # a few steps past the checkpoint, ending mid-epoch
    summary = run(out, *common, "--resume", "auto", "--max-steps", str(end))
    assert summary["step"] == end
    assert metric_steps(out) == list(range(1, end + 1))  # steps after the checkpoint were redone once
    run(tmp_path / "straight", *common, "--max-steps", str(end))
    assert_same_weights(load_checkpoint(list_checkpoints(out)[0]), load_checkpoint(list_checkpoints(tmp_path / "straight")[0]))


KILL_IN_SECOND_SAVE = textwrap.dedent(
    """
    import io, os, signal, sys, torch
    real_save = torch.save
    calls = []
    def dying_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) < 2:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: buffer.tell() // 2])  # half the bytes are on disk...
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # ...when the process dies
    torch.save = dying_save
    from evomask_train.train import main
    main(sys.argv[1:])
    """
)


def test_killed_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    """A kill halfway through writing checkpoint 4 leaves checkpoint 2 intact and no file named like a
    checkpoint that is not one; resume removes the partial file and continues from step 2."""
    common = ["--mask", "random", "--epochs", "2", "--save-every", "2", "--seed", "1"]
    cmd = [sys.executable, "-c", KILL_IN_SECOND_SAVE, *TINY, *common, "--output-dir", str(tmp_path)]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stdout[-2000:] + done.stderr[-2000:]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000002.pt"]
    partial = list(tmp_path.glob(".checkpoint-00000004.pt.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0
    assert load_checkpoint(tmp_path / "checkpoint-00000002.pt")["step"] == 2

    summary = run(tmp_path, *common, "--resume", "auto", "--max-steps", "4")
    assert summary["step"] == 4
    assert not list(tmp_path.glob(".checkpoint-*.tmp"))
    run(tmp_path / "straight", *common, "--max-steps", "4")
    assert_same_weights(load_checkpoint(list_checkpoints(tmp_path)[0]), load_checkpoint(list_checkpoints(tmp_path / "straight")[0]))


# --------------------------------------------------------------------------------------------
# corrupt checkpoints


class NotATensor:
    pass


def damage_checkpoint(path: Path, damage: str) -> None:
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 3])
    elif damage == "garbage":
        path.write_bytes(os.urandom(4096))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "bit-flip":  # one bit inside a tensor's bytes: torch.load alone would not notice
        data[len(data) // 2] ^= 0x10
        path.write_bytes(data)
    elif damage == "pickled-object":
        torch.save({"step": 4, "model": NotATensor()}, path)
    else:
        raise ValueError(damage)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "bit-flip", "pickled-object"])
def test_corrupt_newest_checkpoint_named_and_resume_falls_back(tmp_path, damage, capsys):
    common = ["--mask", "grid", "--epochs", "2", "--save-every", "2", "--keep-checkpoints", "2", "--seed", "2"]
    run(tmp_path, *common, "--max-steps", "4")
    newest = tmp_path / "checkpoint-00000004.pt"
    damage_checkpoint(newest, damage)

    with pytest.raises(RuntimeError, match=r"checkpoint .*checkpoint-00000004\.pt is unreadable or corrupt"):
        load_checkpoint(newest)
    with pytest.raises(RuntimeError, match=r"checkpoint-00000004\.pt is unreadable or corrupt"):
        run(tmp_path, *common, "--resume", str(newest), "--max-steps", "5")
    capsys.readouterr()
    with pytest.warns(RuntimeWarning, match=r"checkpoint-00000004\.pt is unreadable .* trying an older checkpoint"):
        summary = run(tmp_path, *common, "--resume", "auto", "--max-steps", "4")
    assert "resumed from step 2" in capsys.readouterr().out
    assert summary["step"] == 4
    run(tmp_path / "straight", *common, "--max-steps", "4")
    assert_same_weights(load_checkpoint(newest), load_checkpoint(list_checkpoints(tmp_path / "straight")[0]))


def test_resume_auto_with_every_checkpoint_corrupt_starts_fresh_with_warnings(tmp_path, capsys):
    common = ["--mask", "random", "--epochs", "1", "--save-every", "2", "--keep-checkpoints", "2"]
    run(tmp_path, *common, "--max-steps", "4")
    for path in list_checkpoints(tmp_path):
        path.write_bytes(b"not a checkpoint")
    with pytest.warns(RuntimeWarning, match="unreadable or corrupt"):
        summary = run(tmp_path, *common, "--resume", "auto", "--max-steps", "1")
    assert summary["step"] == 1
    assert "no checkpoint" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# divergence


class SpyStrategy:
    """Wraps a strategy and records whether any attention it was given was non-finite."""

    def __init__(self, inner, seen: list):
        self.inner, self.seen = inner, seen
        self.needs, self.mask_ratio = inner.needs, inner.mask_ratio

    def __call__(self, ctx, progress):
        for value in (ctx.attn, ctx.cls_attn):
            if value is not None:
                self.seen.append(bool(torch.isfinite(value).all()))
        return self.inner(ctx, progress)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def poisoned_attention(real, bad_call: int):
    calls = []

    def attention_maps(*args, **kwargs):
        maps = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == bad_call:
            (maps.patch if maps.patch is not None else maps.cls)[0, 1] = float("nan")
        return maps

    return attention_maps


@pytest.mark.parametrize("strategy", ["ehm", "epm", "attn"])
def test_nan_attention_stops_before_the_masking_ops(tmp_path, monkeypatch, strategy):
    """Attention that turns NaN at step 2 stops the run with the step in the message; the strategy
    (and so the mask ops) never sees it, and the last checkpoint holds finite weights."""
    seen: list[bool] = []
    real_build = masker_module.build_strategy
    monkeypatch.setattr(masker_module, "build_strategy", lambda *a, **k: SpyStrategy(real_build(*a, **k), seen))
    monkeypatch.setattr(mask_fn_module, "attention_maps", poisoned_attention(mask_fn_module.attention_maps, bad_call=3))
    with pytest.raises(NonFiniteError, match=r"attention of the encoder's first blocks is NaN/Inf at step 2"):
        run(tmp_path, "--mask", strategy, "--epochs", "1", "--save-every", "1", "--max-steps", "5")
    assert seen and all(seen)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000002.pt", "checkpoint-00000001.pt"]
    state = load_checkpoint(tmp_path / "checkpoint-00000002.pt")
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert metric_steps(tmp_path) == [1, 2]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_is_not_stepped_and_main_exits_3(tmp_path, monkeypatch, capsys, bad):
    """A loss that turns NaN/Inf at step 3: the optimiser does not step, ``main`` prints what happened
    and where and exits with status 3 (no traceback), the checkpoint of step 2 stays the newest."""
    real_forward = train_module.MaskedAutoencoder.forward
    calls = []

    def forward(self, imgs, mask_fn=None):
        loss, pred, mask = real_forward(self, imgs, mask_fn=mask_fn)
        if self.training:
            calls.append(1)
            if len(calls) == 4:
                loss = loss * bad
        return loss, pred, mask

    monkeypatch.setattr(train_module.MaskedAutoencoder, "forward", forward)
    steps_taken = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (steps_taken.append(1), real_step(self, *a, **k))[1])
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY, "--output-dir", str(tmp_path), "--mask", "random", "--epochs", "1", "--save-every", "2",
              "--max-steps", "6"])
    assert exit_info.value.code == 3
    err = capsys.readouterr().err
    assert f"the loss is {bad}" in err and "at step 3" in err and "not taken" in err
    assert len(steps_taken) == 3
    assert list_checkpoints(tmp_path)[0].name == "checkpoint-00000002.pt"


def test_non_finite_gradient_is_not_stepped(tmp_path, monkeypatch):
    real_backward = torch.Tensor.backward
    calls = []

    def backward(self, *args, **kwargs):
        real_backward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            param = next(p for p in train_module_model[0].parameters() if p.grad is not None)
            param.grad.view(-1)[0] = float("inf")

    train_module_model = []
    real_build = train_module.build_mae
    monkeypatch.setattr(train_module, "build_mae", lambda *a, **k: train_module_model.append(real_build(*a, **k)) or train_module_model[0])
    monkeypatch.setattr(torch.Tensor, "backward", backward)
    with pytest.raises(NonFiniteError, match=r"gradient norm is inf at step 1"):
        run(tmp_path, "--mask", "random", "--epochs", "1", "--max-steps", "4")
    assert all(torch.isfinite(p).all() for p in train_module_model[0].parameters())


# --------------------------------------------------------------------------------------------
# data faults


def write_images(folder: Path, count: int, gen: torch.Generator) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        pixels = (torch.rand(40, 40, 3, generator=gen) * 255).to(torch.uint8).numpy()
        paths.append(folder / f"img{i:02d}.png")
        Image.fromarray(np.ascontiguousarray(pixels)).save(paths[-1])
    return paths


def test_images_that_vanish_or_rot_between_epochs_are_skipped(tmp_path, monkeypatch, gen):
    paths = write_images(tmp_path / "data", 8, gen)
    real_set_epoch = engine_module.set_loader_epoch

    def set_loader_epoch(loader, epoch):
        if epoch == 1:
            paths[3].unlink()
            paths[5].write_bytes(b"\x89PNG broken")
        real_set_epoch(loader, epoch)

    monkeypatch.setattr(engine_module, "set_loader_epoch", set_loader_epoch)
    with pytest.warns(CorruptImageWarning) as warned:
        summary = run(tmp_path / "out", "--data", str(tmp_path / "data"), "--mask", "ehm", "--epochs", "2")
    assert summary["step"] == 4 and np.isfinite(summary["loss"])
    messages = " ".join(str(w.message) for w in warned)
    assert "img03.png" in messages and "img05.png" in messages


@pytest.mark.parametrize("case", ["missing", "empty", "not-a-folder"])
def test_unusable_data_folder_is_a_clear_error(tmp_path, case, capsys):
    data = tmp_path / "data"
    if case == "empty":
        data.mkdir()
        (data / "notes.txt").write_text("no images here")
    elif case == "not-a-folder":
        data.write_text("a file")
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY, "--output-dir", str(tmp_path / "out"), "--data", str(data), "--max-steps", "1"])
    assert exit_info.value.code == 3
    err = capsys.readouterr().err
    assert f"--data {data}" in err and str(data) in err


def test_unreadable_images_only_is_a_clear_error(tmp_path, gen):
    paths = write_images(tmp_path / "data", 4, gen)
    for path in paths:
        path.write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="no readable image among the 4 files"):
        with pytest.warns(CorruptImageWarning):
            run(tmp_path / "out", "--data", str(tmp_path / "data"), "--max-steps", "1")


# --------------------------------------------------------------------------------------------
# a full disk


def failing_save_on_call(n: int, real):
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) >= n:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *args, **kwargs)

    return save


def test_disk_full_while_checkpointing_stops_and_keeps_what_was_written(tmp_path, monkeypatch):
    common = ["--mask", "random", "--epochs", "1", "--save-every", "2", "--max-steps", "6"]
    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save_on_call(2, torch.save))
    with pytest.raises(TrainingStopped, match=r"could not write checkpoint .*checkpoint-00000004\.pt at step 4: "
                                              r".*No space left on device.* newest intact checkpoint is .*00000002"):
        run(tmp_path, *common)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000002.pt"]
    assert load_checkpoint(tmp_path / "checkpoint-00000002.pt")["step"] == 2
    assert not list(tmp_path.glob(".checkpoint-*"))  # the partial file was removed
    assert metric_steps(tmp_path) == [1, 2, 3, 4]


def test_disk_full_while_logging_stops_and_keeps_the_log(tmp_path, monkeypatch):
    real_write = run_state_module.MetricsLog.write

    def write(self, row):
        if row["step"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(self, row)

    monkeypatch.setattr(run_state_module.MetricsLog, "write", write)
    with pytest.raises(TrainingStopped, match=r"could not write .*metrics\.csv at step 3: .*No space left"):
        run(tmp_path, "--mask", "random", "--epochs", "1", "--max-steps", "5")
    assert metric_steps(tmp_path) == [1, 2]


def test_disk_full_when_resuming_keeps_the_old_metrics(tmp_path, monkeypatch):
    """The metrics log is rewritten on resume; a failing rewrite must not truncate it."""
    common = ["--mask", "random", "--epochs", "1", "--save-every", "2"]
    run(tmp_path, *common, "--max-steps", "3")
    before = (tmp_path / "metrics.csv").read_text()
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("metrics.csv"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(train_module.os, "replace", replace)
    with pytest.raises(TrainingStopped, match=r"could not write .*metrics\.csv.*No space left"):
        run(tmp_path, *common, "--resume", "auto", "--max-steps", "4")
    assert (tmp_path / "metrics.csv").read_text() == before
    assert not list(tmp_path.glob(".metrics.csv*"))


# --------------------------------------------------------------------------------------------
# repeatability


def recorded_masks(monkeypatch) -> list[torch.Tensor]:
    masks: list[torch.Tensor] = []
    real_call = mask_fn_module.ModelMasks.__call__

    def call(self, imgs, tokens, model):
        mask = real_call(self, imgs, tokens, model)
        masks.append(mask.clone())
        return mask

    monkeypatch.setattr(mask_fn_module.ModelMasks, "__call__", call)
    return masks


CUDA_DETERMINISTIC = pytest.param(
    "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
)


@pytest.mark.parametrize("device", ["cpu", CUDA_DETERMINISTIC])
@pytest.mark.parametrize("strategy", ["ehm", "epm", "random"])
def test_same_seed_same_masks_and_losses(tmp_path, monkeypatch, strategy, device):
    """Same seed, same device: identical masks, losses and weights (on CUDA with --deterministic)."""
    masks = recorded_masks(monkeypatch)
    common = ["--mask", strategy, "--epochs", "2", "--max-steps", "5", "--device", device]
    if device == "cuda":
        common.append("--deterministic")
    runs = {}
    for name, seed in (("a", "7"), ("b", "7"), ("other-seed", "8")):
        masks.clear()
        run(tmp_path / name, *common, "--seed", seed)
        runs[name] = ([m.cpu() for m in masks], (tmp_path / name / "metrics.csv").read_text().splitlines())
    masks_a, log_a = runs["a"]
    masks_b, log_b = runs["b"]
    assert len(masks_a) == len(masks_b) >= 5
    assert all(torch.equal(x, y) for x, y in zip(masks_a, masks_b))
    losses = [line.split(",")[3] for line in log_a[1:]]
    assert losses == [line.split(",")[3] for line in log_b[1:]]
    assert_same_weights(load_checkpoint(list_checkpoints(tmp_path / "a")[0]), load_checkpoint(list_checkpoints(tmp_path / "b")[0]))
    masks_other, _ = runs["other-seed"]
    assert not all(torch.equal(x, y) for x, y in zip(masks_a, masks_other))


# --------------------------------------------------------------------------------------------
# bad command lines


@pytest.mark.parametrize("argv, flag, expected", [
    (["--mask-ratio", "1.5"], "--mask-ratio", r"a number in \(0, 1\)"),
    (["--mask-ratio", "0"], "--mask-ratio", r"a number in \(0, 1\)"),
    (["--batch-size", "0"], "--batch-size", "an integer >= 1"),
    (["--epochs", "two"], "--epochs", "an integer >= 1"),
    (["--save-every", "0"], "--save-every", "an integer >= 1"),
    (["--log-every", "-1"], "--log-every", "an integer >= 1"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints", "an integer >= 1"),
    (["--accum-iter", "0"], "--accum-iter", "an integer >= 1"),
    (["--blr", "nan"], "--blr", "a finite number > 0"),
    (["--lr=-1e-3"], "--lr", "a finite number > 0"),
    (["--warmup-epochs", "inf"], "--warmup-epochs", "a finite number >= 0"),
    (["--em-iters", "-2"], "--em-iters", "an integer >= 0"),
    (["--num-parts", "0"], "--num-parts", "an integer >= 1"),
    (["--mask", "nope"], "--mask", "invalid choice"),
])
def test_bad_flags_are_named_by_the_parser(argv, flag, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err
    assert re.search(expected, err), err


@pytest.mark.parametrize("argv, expected", [
    (["--img-size", "30", "--patch-size", "8"], r"--img-size 30 / --patch-size 8: .*multiple of patch_size"),
    (["--device", "gpu"], r"--device 'gpu' is not a device"),
    (["--device", "cuda:7"] if torch.cuda.is_available() else ["--device", "cuda"], r"--device cuda"),
    (["--attn-layers", "13"], r"--attn-layers must be in \[1, 12\]"),
])
def test_bad_configurations_stop_with_the_flag_named(tmp_path, argv, expected, capsys):
    argv = [*TINY, "--output-dir", str(tmp_path), "--max-steps", "1", *argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 3, (exit_info.value.code, err)
    assert re.search(rf"^\[evomask\] stopped: .*{expected}", err, re.M), err


def test_deterministic_flag_is_scoped_to_the_run(tmp_path, monkeypatch):
    seen = []
    real_call = mask_fn_module.ModelMasks.__call__

    def call(self, imgs, tokens, model):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return real_call(self, imgs, tokens, model)

    monkeypatch.setattr(mask_fn_module.ModelMasks, "__call__", call)
    assert not torch.are_deterministic_algorithms_enabled()
    run(tmp_path, "--mask", "ehm", "--epochs", "1", "--max-steps", "2", "--deterministic")
    assert seen and all(seen)
    assert not torch.are_deterministic_algorithms_enabled()
