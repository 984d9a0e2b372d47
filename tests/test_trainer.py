"""The MAE trainer: every strategy trains, resume is exact, DDP runs, attention maps are right."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evomask_ext
from evomask_ext.attention import attention_maps
from evomask_ext.masking import STRATEGIES
from evomask_ext.reference import masked_count
from evomask_train.checkpoint import list_checkpoints, load_checkpoint
from evomask_train.model import build_mae
from evomask_ext import EvolvedMasker
from evomask_train.mask_fn import ModelMasks
from evomask_train.train import TrainingStopped, build_parser, train

# 32 px images in 8 px patches: N = 16, so a step takes well under a second on a CPU core.
TINY = ["--model", "tiny", "--img-size", "32", "--patch-size", "8", "--batch-size", "4", "--dataset-length", "32",
        "--device", "cpu", "--warmup-epochs", "1", "--gallery-images", "2", "--log-every", "1"]


def run(tmp: Path, *extra: str) -> dict:
    return train(build_parser().parse_args([*TINY, "--output-dir", str(tmp), *extra]))


#: The attention options of EHM/EPM/AttnMask, beside each strategy's defaults.
VARIANTS = [
    ("epm", "--epm-variant", "released"),
    ("epm", "--epm-variant", "released", "--attn-source", "ema", "--attn-layers", "all", "--attn-reduce", "sum"),
    ("ehm", "--attn-source", "ema", "--ema-decay", "0.9"),
    ("attn", "--attn-source", "ema"),
]


@pytest.mark.parametrize("strategy", [*sorted(STRATEGIES), *VARIANTS], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_two_steps_per_strategy(tmp_path, strategy):
    """Each strategy (and the attention variants) trains 2 steps: finite loss, metrics, a checkpoint and a gallery PNG."""
    strategy, *options = (strategy,) if isinstance(strategy, str) else strategy
    summary = run(tmp_path, "--mask", strategy, "--epochs", "2", "--max-steps", "2", "--mask-ratio", "0.6", *options)
    assert summary["step"] == 2 and torch.isfinite(torch.tensor(summary["loss"]))
    rows = (tmp_path / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].startswith("step,") and len(rows) == 3
    assert list_checkpoints(tmp_path)
    gallery = list((tmp_path / "gallery").glob("*.png"))
    assert gallery and gallery[0].stat().st_size > 1000


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_step_masker_exact_count(strategy):
    """The masks the trainer feeds the model have exactly N - int(N (1 - r)) patches per image."""
    torch.manual_seed(0)
    model = build_mae("tiny", img_size=48, patch_size=8).eval()
    masker = ModelMasks(EvolvedMasker(strategy, 0.7, seed=1), attn_layers=3)
    masker.total_steps = 2
    for step in (0, 1, 2):  # progress 0, 0.5, 1
        masker.step = step
        imgs = torch.randn(3, 3, 48, 48)
        mask = masker(imgs, model.embed(imgs), model)
        assert mask.dtype == torch.bool and mask.shape == (3, 36)
        assert mask.sum(dim=1).tolist() == [masked_count(36, 0.7)] * 3


@pytest.mark.parametrize("attention", [
    (),
    ("--attn-source", "ema", "--ema-decay", "0.9"),
    ("--mask", "epm", "--epm-variant", "released", "--attn-source", "ema", "--attn-layers", "all", "--attn-reduce", "sum"),
], ids=["online", "ema", "epm-released-ema"])
def test_resume_equals_straight_run(tmp_path, attention):
    """2 steps + resume + 2 steps gives bitwise the weights (and the EMA teacher) of 4 straight steps (mid-epoch)."""
    common = ("--mask", "ehm", "--epochs", "2", "--save-every", "2", "--seed", "3", *attention)
    run(tmp_path / "straight", *common, "--max-steps", "4")
    run(tmp_path / "split", *common, "--max-steps", "2")
    run(tmp_path / "split", *common, "--max-steps", "4", "--resume", "auto")
    straight = load_checkpoint(list_checkpoints(tmp_path / "straight")[0])
    split = load_checkpoint(list_checkpoints(tmp_path / "split")[0])
    assert straight["step"] == split["step"] == 4
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, split["model"][name]), name
    assert torch.equal(straight["rng"][0]["mask"], split["rng"][0]["mask"])
    assert ("ema" in straight) == ("ema" in split) == ("ema" in attention)
    for name, tensor in straight.get("ema", {}).items():
        assert torch.equal(tensor, split["ema"][name]), name
    lines = (tmp_path / "split" / "metrics.csv").read_text().strip().splitlines()
    assert [line.split(",")[0] for line in lines[1:]] == ["1", "2", "3", "4"]


def test_checkpoints_load_weights_only(tmp_path):
    """Checkpoints hold plain tensors and containers only."""
    run(tmp_path, "--mask", "random", "--epochs", "1", "--max-steps", "1")
    path = list_checkpoints(tmp_path)[0]
    state = torch.load(path, weights_only=True)
    assert {"model", "optimizer", "scheduler", "step", "rng"} <= state.keys()


@pytest.mark.parametrize("attention", [(), ("--attn-source", "ema")], ids=["online", "ema"])
def test_ddp_two_processes_gloo(tmp_path, attention):
    """torchrun with 2 CPU processes (gloo) trains and rank 0 writes the outputs (with an EMA teacher:
    each process keeps its own, not wrapped in DDP)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "evomask_train.train", *TINY, "--mask", "ehm", "--epochs", "1", "--max-steps", "2",
           "--output-dir", str(tmp_path), *attention]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert '"step": 2' in done.stdout
    state = load_checkpoint(list_checkpoints(tmp_path)[0])
    assert len(state["rng"]) == 2  # both ranks' mask generators are saved
    assert not torch.equal(state["rng"][0]["mask"], state["rng"][1]["mask"])
    assert state["world"] == 2
    assert ("ema" in state) == bool(attention)
    assert not (tmp_path / "evomask.lock").exists()  # held by rank 0 alone, released at the end


def test_attention_maps_match_timm_softmax():
    """attention_maps equals the probabilities timm's unfused attention computes (captured by a hook)."""
    torch.manual_seed(0)
    model = build_mae("tiny", img_size=40, patch_size=8).eval()
    tokens = model.embed(torch.randn(2, 3, 40, 40))
    captured = []
    for block in model.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda mod, inp, out: captured.append(inp[0].detach()))
    x = tokens
    with torch.no_grad():
        for block in model.blocks:
            x = block(x)
    layers = 4
    expected_patch = torch.stack([p.mean(dim=1) for p in captured[:layers]]).mean(dim=0)[:, 1:, 1:]
    expected_cls = captured[-1].mean(dim=1)[:, 0, 1:]
    maps = attention_maps(model.blocks, tokens, patch_layers=layers, cls_from_last=True)
    torch.testing.assert_close(maps.patch, expected_patch, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps.cls, expected_cls, rtol=1e-5, atol=1e-6)
    # and the EHM mask of the trainer's similarity is the op's mask on it
    mask = evomask_ext.hier_mask(maps.patch, 0.75, 0.5, noise=torch.rand(2, 25))
    assert mask.sum(1).tolist() == [masked_count(25, 0.75)] * 2


def test_bad_attn_layers_is_a_clear_error(tmp_path):
    with pytest.raises(TrainingStopped, match="attn-layers"):
        run(tmp_path, "--attn-layers", "13", "--max-steps", "1")


def test_metrics_epoch_and_galleries_count_epochs_completed(tmp_path, monkeypatch):
    """metrics.csv's epoch is step / steps per epoch; a gallery is titled with the same number and
    its step, and drawn at the t/T the next step trains with (8 steps per epoch, 16 in all)."""
    import evomask_train.engine as engine_module

    drawn = []
    real = engine_module.save_gallery

    def record(model, imgs, mask, pred, attn_layers, path, title, progress=None, similarity=None):
        drawn.append((Path(path).name, title, progress))
        assert similarity is not None and similarity.shape == (len(imgs), 16, 16)  # the masks' own (ehm)
        return real(model, imgs, mask, pred, attn_layers, path, title, progress=progress, similarity=similarity)

    monkeypatch.setattr(engine_module, "save_gallery", record)
    run(tmp_path, "--mask", "ehm", "--epochs", "2", "--max-steps", "11", "--gallery-every", "1")
    lines = (tmp_path / "metrics.csv").read_text().strip().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    assert [int(r["step"]) for r in rows] == list(range(1, 12))
    assert [float(r["epoch"]) for r in rows] == [round(s / 8, 4) for s in range(1, 12)]
    assert rows[7]["epoch"] == "1"  # a whole number of epochs reads as an integer
    assert [(name, progress) for name, _, progress in drawn] == [("epoch0001.png", 0.5), ("epoch0002.png", 11 / 16)]
    assert "epoch 1 (step 8), t/T = 0.50" in drawn[0][1]
    assert "epoch 1.375 (step 11), t/T = 0.69" in drawn[1][1]


def test_help_states_each_default_once_and_never_none():
    """--help: no option block with two "(default:", none with "(default: None)", and --deterministic
    does not promise bitwise-repeatable CUDA runs."""
    import re

    text = build_parser().format_help()
    blocks = [" ".join(block.split()) for block in re.split(r"\n  (?=-)", text)]
    for block in blocks:
        assert block.count("(default:") <= 1, block
        assert "(default: None)" not in block, block
    for line in text.splitlines():
        assert line.count("(default:") <= 1, line
    assert any(b.startswith("--dataset-length") and "(default: 1024)" in b for b in blocks)
    deterministic = next(b for b in blocks if b.startswith("--deterministic"))
    assert "CUBLAS_WORKSPACE_CONFIG" in deterministic and "not verified" in deterministic
