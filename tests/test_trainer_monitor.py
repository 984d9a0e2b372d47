"""The trainer's k-NN monitor (--eval-every): the logged accuracy is evomask-eval's, and the run's
weights are those of a run without it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from evomask_train import evaluate
from evomask_train.checkpoint import list_checkpoints, load_checkpoint
from evomask_train.train import build_parser, main, train

# 32 px images in 8 px patches (N = 16): 8 steps per epoch of 32 images.
TINY = ["--model", "tiny", "--img-size", "32", "--patch-size", "8", "--batch-size", "4", "--dataset-length", "32",
        "--device", "cpu", "--warmup-epochs", "1", "--gallery-images", "2", "--gallery-every", "100",
        "--log-every", "4", "--mask", "ehm", "--epochs", "2", "--seed", "2"]


def run(out: Path, *extra: str) -> dict:
    return train(build_parser().parse_args([*TINY, "--output-dir", str(out), *extra]))


def test_knn_rows_equal_evomask_eval_and_weights_are_untouched(tmp_path, capsys):
    run(tmp_path / "plain")
    run(tmp_path / "monitored", "--eval-every", "1")
    with (tmp_path / "monitored" / "metrics.csv").open() as f:
        evals = [row for row in csv.DictReader(f) if row["knn_top1"]]
    assert [int(row["step"]) for row in evals] == [8, 16]
    assert [float(row["epoch"]) for row in evals] == [1, 2]
    plain = load_checkpoint(list_checkpoints(tmp_path / "plain")[0])
    monitored = load_checkpoint(list_checkpoints(tmp_path / "monitored")[0])
    assert plain["step"] == monitored["step"] == 16
    for name, tensor in plain["model"].items():
        assert torch.equal(tensor, monitored["model"][name]), name
    assert torch.equal(plain["rng"][0]["mask"], monitored["rng"][0]["mask"])
    assert torch.equal(plain["rng"][0]["torch"], monitored["rng"][0]["torch"])

    capsys.readouterr()
    evaluate.main(["--checkpoint", str(list_checkpoints(tmp_path / "monitored")[0]), "--protocol", "knn",
                   "--device", "cpu"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert float(evals[-1]["knn_top1"]) == round(result["top1"], 3)


def test_bad_eval_data_stops_at_start_up(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main([*TINY, "--output-dir", str(tmp_path / "run"), "--eval-every", "1", "--eval-data", str(tmp_path / "none")])
    assert stopped.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[evomask] stopped: --eval-data") and str(tmp_path / "none") in err[0]
    assert not list_checkpoints(tmp_path / "run")
