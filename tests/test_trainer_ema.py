"""--attn-source ema: the EMA teacher follows its formula, the masks read its blocks on the online
model's tokens, checkpoints carry it, resume refuses other attention flags, and flags that a
strategy would ignore are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evomask_ext.attention import attention_maps
from evomask_ext.masking import MaskContext, build_strategy
from evomask_train.checkpoint import list_checkpoints, load_checkpoint
from evomask_train.ema import EMATeacher
from evomask_train.model import build_mae
from evomask_ext import EvolvedMasker
from evomask_train.mask_fn import ModelMasks
from evomask_train.train import build_parser, main, train

# 32 px images in 8 px patches (N = 16): 8 steps per epoch of 32 images.
TINY = ["--model", "tiny", "--img-size", "32", "--patch-size", "8", "--batch-size", "4", "--dataset-length", "32",
        "--device", "cpu", "--warmup-epochs", "1", "--gallery-images", "2", "--gallery-every", "100",
        "--log-every", "1", "--epochs", "2"]


def run(out: Path, *extra: str) -> dict:
    return train(build_parser().parse_args([*TINY, "--output-dir", str(out), *extra]))


def stop_line(capsys, out: Path, *extra: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main([*TINY, "--output-dir", str(out), *extra])
    assert stopped.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("[evomask] stopped: "), err
    return "\n".join(err)


def test_ema_update_is_the_formula_from_the_first_step():
    """ema = decay * ema + (1 - decay) * online for parameters and buffers, the first update included."""
    torch.manual_seed(0)
    model = build_mae("tiny", img_size=32, patch_size=8)
    model.register_buffer("extra", torch.zeros(3))
    teacher = EMATeacher(model, 0.75)
    expected = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    for _ in range(3):
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.add_(torch.randn_like(tensor))
        teacher.update(model)
        online = model.state_dict()
        expected = {k: 0.75 * v + 0.25 * online[k] for k, v in expected.items()}
    for name, tensor in teacher.module.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-6, atol=1e-6, msg=name)
    assert not any(p.requires_grad for p in teacher.module.parameters())


def test_masks_read_the_teacher_blocks_on_the_online_tokens():
    """With a teacher, the mask is the strategy's on attention_maps(teacher blocks, online tokens)."""
    torch.manual_seed(0)
    online = build_mae("tiny", img_size=32, patch_size=8).eval()
    torch.manual_seed(1)
    other = build_mae("tiny", img_size=32, patch_size=8).eval()
    teacher = EMATeacher(other, 0.5)
    imgs = torch.randn(3, 3, 32, 32)
    tokens = online.embed(imgs)
    for reduce in ("mean", "sum"):
        masker = ModelMasks(EvolvedMasker("ehm", 0.75, seed=4), 12, teacher=teacher, reduce=reduce)
        masker.step, masker.total_steps = 7, 10  # progress 0.7
        got = masker(imgs, tokens, online)
        maps = attention_maps(other.blocks, tokens, patch_layers=12, reduce=reduce)
        ctx = MaskContext(batch_size=3, grid=(4, 4), device=tokens.device,
                          generator=torch.Generator().manual_seed(4), attn=maps.patch)
        want = build_strategy("ehm", 0.75)(ctx, 0.7)
        assert torch.equal(got, want), reduce
        online_maps = attention_maps(online.blocks, tokens, patch_layers=12, reduce=reduce)
        assert not torch.allclose(maps.patch, online_maps.patch)  # the teacher's attention, not the online one


def test_checkpoint_holds_the_teacher_and_resume_refuses_other_attention_flags(tmp_path, capsys):
    out = tmp_path / "run"
    run(out, "--mask", "epm", "--epm-variant", "released", "--attn-source", "ema", "--ema-decay", "0.9",
        "--max-steps", "2")
    state = load_checkpoint(list_checkpoints(out)[0])
    assert state["ema"]["n_averaged"].item() == 3  # the starting copy and two updates
    moved = [k for k, v in state["model"].items() if not torch.equal(v, state["ema"][f"module.{k}"])]
    assert moved  # the teacher lags behind the online weights
    base = ["--mask", "epm", "--epm-variant", "released", "--attn-source", "ema", "--ema-decay", "0.9",
            "--max-steps", "4", "--resume", "auto"]
    for flag, value, saved in (("--attn-source", "online", "ema"), ("--ema-decay", "0.5", "0.9"),
                               ("--epm-variant", "paper", "released"), ("--attn-reduce", "sum", "mean"),
                               ("--attn-layers", "all", "6")):
        argv = list(base)
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
        text = stop_line(capsys, out, *argv)
        assert f"{flag}: saved {saved}, now " in text, text
    assert [int(p.name[11:19]) for p in list_checkpoints(out)] == [2]


@pytest.mark.parametrize("argv, expected", [
    (["--mask", "random", "--attn-source", "ema"], "--attn-source ema applies to the strategies that read attention"),
    (["--mask", "attn", "--attn-reduce", "sum"], "--attn-reduce sum applies to the strategies that read the patch"),
    (["--mask", "ehm", "--epm-variant", "released"], "--epm-variant released applies to --mask epm"),
    (["--mask", "epm", "--epm-variant", "released", "--gamma", "3"], "--gamma 3.0 applies to --epm-variant paper only"),
    (["--mask", "epm", "--epm-variant", "released", "--em-iters", "4"], "--em-iters 4 applies to --epm-variant paper"),
])
def test_flags_a_strategy_would_ignore_stop_the_run(tmp_path, capsys, argv, expected):
    assert expected in stop_line(capsys, tmp_path, *argv, "--max-steps", "1")
    assert not list_checkpoints(tmp_path)


@pytest.mark.parametrize("argv, expected", [
    (["--attn-layers", "most"], "expected an integer >= 1 or 'all', got 'most'"),
    (["--ema-decay", "1"], "expected a number in (0, 1), got 1"),
    (["--attn-source", "teacher"], "invalid choice: 'teacher'"),
])
def test_bad_attention_flags_are_named_by_the_parser(argv, expected, capsys):
    with pytest.raises(SystemExit) as stopped:
        build_parser().parse_args([*TINY, *argv])
    assert stopped.value.code == 2
    assert expected in capsys.readouterr().err
