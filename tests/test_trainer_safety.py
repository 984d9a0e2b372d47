"""The trainer guards its output folder and its resumes: one run per --output-dir, a resume
that would change the model, the data order or the masks is refused, start-up faults stop with
one ``[evomask] stopped:`` line (exit 3), and a mask ratio that masks or keeps no patch is refused."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evomask_train.train as train_module
from evomask_train.checkpoint import list_checkpoints
from evomask_train.train import build_parser, main, train

# 32 px images in 8 px patches (N = 16): 8 steps per epoch of 32 images, well under a second each.
TINY = ["--model", "tiny", "--img-size", "32", "--patch-size", "8", "--batch-size", "4", "--dataset-length", "32",
        "--device", "cpu", "--warmup-epochs", "1", "--gallery-images", "2", "--gallery-every", "100",
        "--log-every", "1"]
LOCK = "evomask.lock"


def run(out: Path, *extra: str) -> dict:
    return train(build_parser().parse_args([*TINY, "--output-dir", str(out), *extra]))


def stopped(capsys, argv: list[str]) -> str:
    """Runs ``main`` expecting exit 3 with one ``[evomask] stopped:`` message and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 3, (exit_info.value.code, err[-3000:])
    assert "Traceback" not in err
    assert err.count("[evomask] stopped: ") == 1, err
    return err[err.index("[evomask] stopped: "):]


def trainer_process(out: Path, log: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "evomask_train.train", *TINY, "--output-dir", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)


def wait_for(proc: subprocess.Popen, log: Path, ready, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def logged_lr(out: Path, step: int) -> float:
    lines = (out / "metrics.csv").read_text().strip().splitlines()[1:]
    return next(float(line.split(",")[4]) for line in lines if int(line.split(",")[0]) == step)


# --------------------------------------------------------------------------------------------
# one run per output folder


def test_second_run_on_a_held_folder_stops_naming_the_holder_and_touches_nothing(tmp_path, capsys):
    """While a trainer runs, a second one on its folder stops with exit 3 naming the holder's pid,
    host and start time, and leaves the holder's checkpoint write in flight and its metrics alone;
    SIGTERM then stops the holder (exit 130), which gives the folder up."""
    out, log = tmp_path / "out", tmp_path / "holder.log"
    proc = trainer_process(out, log, "--mask", "random", "--epochs", "50", "--save-every", "1")
    try:
        wait_for(proc, log, lambda: (out / "metrics.csv").exists() and len(list_checkpoints(out)) >= 1,
                 "first checkpoint")
        in_flight = out / ".checkpoint-00009999.pt.abcd.tmp"
        in_flight.write_bytes(b"half a checkpoint")
        err = stopped(capsys, [*TINY, "--output-dir", str(out), "--mask", "random", "--max-steps", "1"])
        assert re.search(rf"in use by pid {proc.pid} on host {re.escape(socket.gethostname())} since "
                         r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", err), err
        assert in_flight.exists()
        assert proc.poll() is None, log.read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert not (out / LOCK).exists()
    steps = [int(line.split(",")[0]) for line in (out / "metrics.csv").read_text().strip().splitlines()[1:]]
    assert steps == list(range(1, len(steps) + 1))  # one writer only


def test_lock_of_a_killed_run_is_taken_over_with_a_note(tmp_path, capsys):
    """A trainer killed with SIGKILL leaves its lock behind; the next run on this host sees that the
    pid is gone, says so in one line, takes the folder over and releases it at the end."""
    out, log = tmp_path / "out", tmp_path / "killed.log"
    common = ["--mask", "random", "--epochs", "2", "--save-every", "2"]
    proc = trainer_process(out, log, *common)
    try:
        wait_for(proc, log, lambda: len(list_checkpoints(out)) >= 1, "first checkpoint")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert (out / LOCK).exists()
    capsys.readouterr()
    summary = run(out, *common, "--resume", "auto", "--max-steps", str(int(list_checkpoints(out)[0].name[11:19]) + 1))
    note = [line for line in capsys.readouterr().out.splitlines() if "taking over" in line]
    assert len(note) == 1 and f"pid {proc.pid} " in note[0] and "no longer running" in note[0], note
    assert summary["step"] >= 3
    assert not (out / LOCK).exists()


def test_lock_from_another_host_is_not_taken(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere.invalid", "since": "2026-01-02 03:04:05 UTC"}))
    err = stopped(capsys, [*TINY, "--output-dir", str(out), "--max-steps", "1"])
    assert "in use by pid 1 on host elsewhere.invalid since 2026-01-02 03:04:05 UTC" in err
    assert f"delete {out / LOCK}" in err
    assert not (out / "metrics.csv").exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process start times come from /proc")
def test_lock_of_a_reused_pid_is_stale_and_a_lock_kept_by_children_is_not(tmp_path):
    """A lock naming a live pid whose process started at another time (the pid was reused) is stale;
    a lock whose recorded pid has ended while the lock itself is still held (by the processes it
    forked, which share the open file) is not, and the message says why."""
    from evomask_train.run_lock import FolderBusy, RunLock

    (tmp_path / LOCK).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                             "pid_started": "0", "since": "earlier"}))
    with RunLock(tmp_path) as lock:
        assert lock.took_over and f"pid {os.getppid()} " in lock.took_over
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()
        (tmp_path / LOCK).write_text(json.dumps({"pid": int(dead), "host": socket.gethostname(), "since": "x"}))
        with pytest.raises(FolderBusy, match=rf"pid {dead} .*has ended but processes it started still hold"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK).exists()


def lock_seen_during_training(monkeypatch, out: Path, fail_at: int | None = None, exc: type = KeyboardInterrupt):
    """Records, at each training forward, whether ``out`` holds a lock naming this process."""
    seen = []
    real_forward = train_module.MaskedAutoencoder.forward

    def forward(self, imgs, mask_fn=None):
        if self.training:
            lock = out / LOCK
            seen.append(lock.exists() and json.loads(lock.read_text())["pid"] == os.getpid())
            if len(seen) == fail_at:
                raise exc("injected")
        return real_forward(self, imgs, mask_fn=mask_fn)

    monkeypatch.setattr(train_module.MaskedAutoencoder, "forward", forward)
    return seen


@pytest.mark.parametrize("ending", ["normal", "stopped", "ctrl-c"])
def test_the_lock_is_held_while_training_and_released_on_every_exit(tmp_path, monkeypatch, capsys, ending):
    out = tmp_path / "out"
    argv = [*TINY, "--output-dir", str(out), "--mask", "random", "--epochs", "1", "--max-steps", "3"]
    if ending == "normal":
        seen = lock_seen_during_training(monkeypatch, out)
        main(argv)
    elif ending == "stopped":
        seen = lock_seen_during_training(monkeypatch, out, fail_at=2, exc=train_module.NonFiniteError)
        stopped(capsys, argv)
    else:
        seen = lock_seen_during_training(monkeypatch, out, fail_at=2)
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 130
    assert seen and all(seen), seen
    assert not (out / LOCK).exists()


# --------------------------------------------------------------------------------------------
# resuming with other flags


SAVED = ["--mask", "ehm", "--epochs", "2", "--save-every", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory) -> Path:
    """Step 2 of a run with ``SAVED``'s flags, trained once for the tests that refuse to resume it."""
    out = tmp_path_factory.mktemp("saved")
    run(out, *SAVED, "--max-steps", "2")
    return list_checkpoints(out)[0]


def copy_of(checkpoint: Path, folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / checkpoint.name).write_bytes(checkpoint.read_bytes())
    return folder / checkpoint.name


def test_resume_with_flags_that_change_data_or_masks_stops_naming_each(tmp_path, capsys, saved_checkpoint):
    copy_of(saved_checkpoint, tmp_path)
    capsys.readouterr()
    changed = [*SAVED, "--batch-size", "2", "--mask", "grid", "--mask-ratio", "0.5", "--seed", "4"]
    err = stopped(capsys, [*TINY, "--output-dir", str(tmp_path), *changed, "--resume", "auto", "--max-steps", "4"])
    assert "checkpoint-00000002.pt" in err
    for line in ("--batch-size: saved 4, now 2", "--mask: saved ehm, now grid", "--mask-ratio: saved 0.75, now 0.5",
                 "--seed: saved 3, now 4"):
        assert re.search(rf"^\s*{re.escape(line)}$", err, re.M), err
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000002.pt"]


@pytest.mark.parametrize("flag, saved, new", [
    ("--model", "tiny", "small"), ("--patch-size", "8", "4"), ("--img-size", "32", "64"), ("--accum-iter", "1", "2"),
    ("--dataset-length", "32", "64"), ("--attn-layers", "6", "3"),
])
def test_resume_with_another_model_or_data_stops_without_a_traceback(tmp_path, capsys, saved_checkpoint, flag,
                                                                    saved, new):
    checkpoint = copy_of(saved_checkpoint, tmp_path)
    capsys.readouterr()
    err = stopped(capsys, [*TINY, "--output-dir", str(tmp_path), *SAVED, flag, new, "--resume", str(checkpoint)])
    assert re.search(rf"^\s*{flag}: saved {saved}, now {new}$", err, re.M), err
    assert len(err.strip().splitlines()) == 2  # the reason, then one line for the flag


def test_resume_with_more_epochs_recomputes_the_schedule_and_says_so(tmp_path, capsys):
    common = ["--mask", "random", "--save-every", "4", "--blr", "1e-3"]
    run(tmp_path / "a", *common, "--epochs", "1", "--max-steps", "4")
    capsys.readouterr()
    run(tmp_path / "a", *common, "--epochs", "2", "--resume", "auto", "--max-steps", "5")
    out = capsys.readouterr().out
    note = [line for line in out.splitlines() if "--epochs 1 -> 2" in line]
    assert len(note) == 1 and "16 steps" in note[0] and "was 8" in note[0] and "learning rate" in note[0], out
    run(tmp_path / "b", *common, "--epochs", "2", "--max-steps", "5")
    assert logged_lr(tmp_path / "a", 5) == logged_lr(tmp_path / "b", 5)  # the 2-epoch schedule


def test_resume_with_a_lower_learning_rate_applies_it(tmp_path, capsys):
    """The divergence messages advise resuming with a lower --blr: it must take effect."""
    common = ["--mask", "random", "--epochs", "1", "--save-every", "4"]
    run(tmp_path / "a", *common, "--blr", "1e-3", "--max-steps", "4")
    run(tmp_path / "a", *common, "--blr", "1e-4", "--resume", "auto", "--max-steps", "5")
    assert "--blr 0.001 -> 0.0001" in capsys.readouterr().out
    run(tmp_path / "b", *common, "--blr", "1e-4", "--max-steps", "5")
    assert logged_lr(tmp_path / "a", 5) == logged_lr(tmp_path / "b", 5)


def test_resume_with_free_flags_changed_is_accepted(tmp_path):
    common = ["--mask", "random", "--epochs", "1", "--seed", "2"]
    run(tmp_path, *common, "--save-every", "2", "--max-steps", "2")
    summary = run(tmp_path, *common, "--save-every", "1", "--keep-checkpoints", "3", "--log-every", "2",
                  "--gallery-every", "1", "--gallery-images", "1", "--amp", "off", "--resume", "auto", "--max-steps", "3")
    assert summary["step"] == 3


# --------------------------------------------------------------------------------------------
# start-up faults: one line, exit 3


def test_resume_from_a_missing_file_is_one_line(tmp_path, capsys):
    missing = tmp_path / "missing.pt"
    err = stopped(capsys, [*TINY, "--output-dir", str(tmp_path / "out"), "--resume", str(missing)])
    assert f"--resume {missing}" in err and "does not exist" in err
    assert len(err.strip().splitlines()) == 1


def test_folder_of_unreadable_images_is_one_line(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"img{i}.png").write_bytes(b"not a png")
    with pytest.warns(Warning):
        err = stopped(capsys, [*TINY, "--output-dir", str(tmp_path / "out"), "--data", str(data), "--max-steps", "1"])
    assert f"--data {data}" in err and "no readable image" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, expected", [
    (["--attn-layers", "99"], r"--attn-layers must be in \[1, 12\] for --model tiny, got 99"),
    (["--batch-size", "64"], r"no full optimiser step per epoch with --batch-size 64"),
])
def test_bad_configurations_are_one_line(tmp_path, capsys, argv, expected):
    err = stopped(capsys, [*TINY, "--output-dir", str(tmp_path), "--max-steps", "1", *argv])
    assert re.search(expected, err), err
    assert len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------
# a mask ratio that masks or keeps no patch


def masked(n: int, ratio: float) -> int:
    return n - int(n * (1 - ratio))


@pytest.mark.parametrize("ratio, problem", [("1e-17", "masks no patch"), ("0.99", "keeps no patch")])
def test_mask_ratio_that_masks_or_keeps_no_patch_is_refused(tmp_path, capsys, ratio, problem):
    err = stopped(capsys, [*TINY, "--output-dir", str(tmp_path), "--max-steps", "1", "--mask-ratio", ratio])
    assert f"--mask-ratio {ratio} {problem}" in err and "N = 16" in err, err
    low, high = (float(x) for x in re.search(r"from (\S+) to (\S+?)[\s,;)]", err).groups())
    assert high == 0.9375  # int(16 * 0.0625) = 1 patch kept
    assert 0 < masked(16, low) and masked(16, high) < 16
    assert masked(16, math.nextafter(high, 1)) == 16
    assert not (tmp_path / "metrics.csv").exists()


def test_extreme_but_usable_ratios_train(tmp_path):
    assert run(tmp_path / "high", "--mask", "random", "--mask-ratio", "0.9375", "--max-steps", "1")["step"] == 1
    assert run(tmp_path / "low", "--mask", "random", "--mask-ratio", "0.01", "--max-steps", "1")["step"] == 1
