"""Run from a checkout, as the docs' DDP line is (``torchrun ... -m evomask_train.train`` in the
repository root), the trainer imports the installed packages, with their compiled kernels: the
sources live under ``src/``, so the root that ``-m`` puts first on ``sys.path`` shadows nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import evomask_ext

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny", "--img-size", "32", "--patch-size", "8", "--batch-size", "4", "--dataset-length", "16",
        "--device", "cpu", "--epochs", "1", "--max-steps", "2", "--warmup-epochs", "1", "--gallery-every", "100",
        "--mask", "ehm"]


def test_the_checkout_root_holds_no_package():
    assert not (ROOT / "evomask_ext").exists() and not (ROOT / "evomask_train").exists()


@pytest.mark.slow
def test_torchrun_from_the_repository_root_uses_the_compiled_kernels(tmp_path):
    if not evomask_ext.COMPILED:
        pytest.skip("the installed package has no compiled library")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EVOMASK_LIBRARY")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "evomask_train.train",
           *TINY, "--output-dir", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RuntimeWarning" not in proc.stderr, proc.stderr[-3000:]
    done = [line for line in proc.stdout.splitlines() if line.startswith("[evomask] done: ")]
    assert len(done) == 1, proc.stdout[-3000:]  # rank 0 only
    summary = json.loads(done[0].removeprefix("[evomask] done: "))
    assert summary["step"] == 2
    assert summary["kernels"]["CPU"] == "compiled", summary
