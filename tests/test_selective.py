"""Selective masking (Wang & Stavness): schedule, exact count, worst-reconstructed patches first,
a snapshot frozen within a step and refreshed at its boundary, exact resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from evomask_ext.masking import MaskContext, build_strategy, random_mask
from evomask_ext.reference import masked_count
from evomask_ext.selective import SelectiveMask, selective_scores, selective_stage
from evomask_train.checkpoint import list_checkpoints, load_checkpoint
from evomask_train.train import build_parser, train


class KnownErrorModel(nn.Module):
    """An 'MAE' whose per-patch reconstruction error is a fixed table, whatever the mask."""

    def __init__(self, errors: torch.Tensor):
        super().__init__()
        self.errors = nn.Parameter(errors.clone(), requires_grad=False)

    def forward(self, images, mask=None):
        return torch.zeros(()), torch.zeros(images.shape[0], self.errors.shape[1]), mask

    def patch_errors(self, images, pred):
        return self.errors[: images.shape[0]]


def context(model, batch=3, grid=(4, 5), seed=0):
    return MaskContext(batch_size=batch, grid=grid, device="cpu", generator=torch.Generator().manual_seed(seed),
                       images=torch.zeros(batch, 3, 8, 10), model=model)


def test_stage_schedule():
    assert [selective_stage(p, 10) for p in (0.0, 0.099, 0.1, 0.55, 0.999, 1.0)] == [0, 0, 1, 5, 9, 9]
    assert selective_stage(1.0, 1) == 0


def test_random_before_first_boundary():
    """Progress below 1/S is MAE random masking from the same generator."""
    strat = SelectiveMask(0.6, steps=4, probes=2)
    model = KnownErrorModel(torch.rand(3, 20))
    for progress in (0.0, 0.1, 0.249):
        got = strat(context(model, seed=5), progress)
        want = random_mask(3, 20, 0.6, "cpu", torch.Generator().manual_seed(5))
        assert torch.equal(got, want)
    assert strat.snapshot is None  # no scoring model is needed in step 0


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.75, 0.9])
def test_exact_count(ratio):
    strat = SelectiveMask(ratio, steps=3, probes=3)
    model = KnownErrorModel(torch.rand(3, 20))
    for progress in (0.0, 0.5, 1.0):
        assert strat(context(model), progress).sum(1).tolist() == [masked_count(20, ratio)] * 3


def test_highest_errors_are_masked():
    """With known errors, the masked patches are the worst ones among those any probe masked."""
    g = torch.Generator().manual_seed(11)
    errors = torch.rand(3, 20, generator=g)
    strat = SelectiveMask(0.5, steps=2, probes=6)
    mask = strat(context(KnownErrorModel(errors), seed=3), 0.7)
    replay = torch.Generator().manual_seed(3)
    ever = torch.zeros(3, 20, dtype=torch.bool)
    for _ in range(6):
        ever |= random_mask(3, 20, 0.5, "cpu", replay)
    k = masked_count(20, 0.5)
    assert bool((ever.sum(1) >= k).all()), "pick a seed where enough patches were probed"
    expected = torch.zeros_like(mask)
    expected.scatter_(1, errors.masked_fill(~ever, -1.0).topk(k, dim=1).indices, True)
    assert torch.equal(mask, expected)


def test_scores_average_only_masked_passes():
    """A patch's score is the mean of its errors over the passes that masked it; never masked -> -inf."""
    calls = []

    def errors_fn(images, mask):
        e = torch.rand(mask.shape, generator=torch.Generator().manual_seed(len(calls)))
        calls.append((mask.clone(), e))
        return e

    scores = selective_scores(errors_fn, torch.zeros(2, 3, 4, 4), 12, 0.5, probes=4,
                              generator=torch.Generator().manual_seed(0))
    total = sum(e * m for m, e in calls)
    count = sum(m.float() for m, _ in calls)
    expected = torch.where(count > 0, total / count.clamp_min(1), torch.tensor(float("-inf")))
    torch.testing.assert_close(scores, expected)


def test_snapshot_frozen_within_a_step_and_refreshed_at_boundary():
    strat = SelectiveMask(0.5, steps=4, probes=8)
    live = KnownErrorModel(torch.rand(3, 20))
    first = strat(context(live, seed=1), 0.3)  # step 1: snapshot of the live model now
    snapshot = strat.snapshot
    live.errors.data = 1.0 - live.errors.data  # the live model trains on: its errors invert
    assert torch.equal(strat(context(live, seed=1), 0.45), first)  # same step: same frozen scorer
    assert strat.snapshot is snapshot
    refreshed = strat(context(live, seed=1), 0.5)  # step 2: new snapshot sees the inverted errors
    assert strat.snapshot is not snapshot and not torch.equal(refreshed, first)


def test_state_dict_round_trip_restores_the_snapshot():
    strat = SelectiveMask(0.5, steps=4, probes=3)
    live = KnownErrorModel(torch.rand(3, 20))
    before = strat(context(live, seed=2), 0.3)
    state = strat.state_dict()
    live.errors.data = torch.rand(3, 20)  # the live model moved on since the checkpoint
    resumed = build_strategy("selective", 0.5, steps=4, probes=3)
    resumed.load_state_dict(state)
    assert torch.equal(resumed(context(live, seed=2), 0.3), before)  # same step: the saved snapshot
    fresh = build_strategy("selective", 0.5, steps=4, probes=3)
    fresh.load_state_dict(state)
    after_boundary = fresh(context(live, seed=2), 0.5)  # later step: snapshot of the live model
    ref = SelectiveMask(0.5, steps=4, probes=3)
    assert torch.equal(after_boundary, ref(context(live, seed=2), 0.5))


@pytest.mark.parametrize("bad", [dict(steps=0), dict(probes=0), dict(steps=1.5)])
def test_bad_options(bad):
    with pytest.raises(ValueError, match="steps|probes"):
        SelectiveMask(0.5, **bad)


def test_missing_inputs_is_a_clear_error():
    ctx = MaskContext(batch_size=2, grid=(2, 2), device="cpu")
    with pytest.raises(ValueError, match="images"):
        SelectiveMask(0.5, steps=2)(ctx, 0.9)


def test_trainer_resume_keeps_the_snapshot(tmp_path):
    """5 steps + resume + 1 equals 6 straight steps; the step-1 snapshot (taken at step 4) is restored."""
    common = ["--model", "tiny", "--img-size", "32", "--patch-size", "8", "--batch-size", "4",
              "--dataset-length", "32", "--device", "cpu", "--warmup-epochs", "1", "--gallery-images", "2",
              "--mask", "selective", "--selective-steps", "4", "--selective-probes", "2", "--epochs", "2",
              "--save-every", "5"]
    run = lambda out, *extra: train(build_parser().parse_args([*common, "--output-dir", str(out), *extra]))  # noqa: E731
    run(tmp_path / "straight", "--max-steps", "6")
    run(tmp_path / "split", "--max-steps", "5")
    saved = load_checkpoint(list_checkpoints(tmp_path / "split")[0])
    assert saved["strategy"]["stage"] == 1 and "snapshot" in saved["strategy"]
    run(tmp_path / "split", "--max-steps", "6", "--resume", "auto")
    a = load_checkpoint(list_checkpoints(tmp_path / "straight")[0])
    b = load_checkpoint(list_checkpoints(tmp_path / "split")[0])
    assert a["step"] == b["step"] == 6
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
