"""evomask-eval: the k-NN and the linear probe against scikit-learn, bad inputs, determinism, end to end.

The oracles are independent implementations run on the same features: scikit-learn's
``KNeighborsClassifier`` (cosine metric, votes weighted ``exp(cos / T)``) for DINO's k-NN and
``LogisticRegression`` on standardised features for the linear probe.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from evomask_train import evaluate as ev
from evomask_train.checkpoint import save_atomic
from evomask_train.model import build_mae
from evomask_train.train import build_parser as pretrain_parser

# Digits subset of the end-to-end tests: 6 images per class in each split (60 train, 60 val).
PER_CLASS = 6


def _blobs(gen: torch.Generator, n: int, classes: int, dim: int, spread: float, centres=None):
    """Gaussian class blobs with per-dimension scales and offsets (so standardising matters)."""
    if centres is None:
        centres = torch.randn(classes, dim, generator=gen, dtype=torch.float64)
    labels = torch.arange(n) % classes
    x = centres[labels] + spread * torch.randn(n, dim, generator=gen, dtype=torch.float64)
    return x, labels, centres


def _sklearn_knn(k: float, temperature: float) -> KNeighborsClassifier:
    return KNeighborsClassifier(
        n_neighbors=k, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1.0 - d) / temperature)
    )


# --------------------------------------------------------------------------------------------
# k-NN


@pytest.mark.parametrize("k, temperature", [(20, 0.07), (5, 0.5), (1, 0.07)])
def test_knn_equals_sklearn(gen, k, temperature):
    train_x, train_y, centres = _blobs(gen, 300, 6, 16, spread=1.2)
    query_x, query_y, _ = _blobs(gen, 120, 6, 16, spread=1.2, centres=centres)
    probs = ev.knn_classify(train_x, train_y, query_x, 6, k=k, temperature=temperature)
    oracle = _sklearn_knn(k, temperature).fit(train_x.numpy(), train_y.numpy())
    np.testing.assert_array_equal(probs.argmax(1).numpy(), oracle.predict(query_x.numpy()))
    np.testing.assert_allclose(probs.numpy(), oracle.predict_proba(query_x.numpy()), rtol=1e-9, atol=1e-12)
    acc = ev.topk_accuracy(probs, query_y)["top1"]
    assert acc == pytest.approx(100 * oracle.score(query_x.numpy(), query_y.numpy()))
    assert 40 < acc < 100  # overlapping blobs: neither chance nor trivially separable


def test_knn_chunks_and_scale_do_not_matter(gen):
    train_x, train_y, centres = _blobs(gen, 200, 4, 8, spread=1.0)
    query_x, _, _ = _blobs(gen, 50, 4, 8, spread=1.0, centres=centres)
    whole = ev.knn_classify(train_x, train_y, query_x, 4, chunk_size=1000)
    chunked = ev.knn_classify(train_x, train_y, query_x, 4, chunk_size=7)
    scaled = ev.knn_classify(3.0 * train_x, train_y, 0.1 * query_x, 4, chunk_size=7)  # cosine: scale-free
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(scaled, whole)


def test_knn_rejects_bad_k(gen):
    x, y, _ = _blobs(gen, 10, 2, 4, spread=1.0)
    with pytest.raises(ValueError, match=r"k must be in \[1, 10\]"):
        ev.knn_classify(x, y, x, 2, k=11)


def test_topk_accuracy_counts_by_hand():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.6, 0.3, 0.1], [0.2, 0.3, 0.5], [0.5, 0.5, 0.0]])
    labels = torch.tensor([2, 0, 1, 1])
    out = ev.topk_accuracy(scores, labels, ks=(1, 2, 5))
    # top-1: row 1 right; row 3 is a tie broken to the first class (0, as sklearn's argmax): wrong
    assert out["top1"] == pytest.approx(25.0)
    assert out["top2"] == pytest.approx(100.0)
    assert out["top5"] == pytest.approx(100.0)  # capped at the 3 classes


# --------------------------------------------------------------------------------------------
# linear probe


@pytest.mark.parametrize("optimizer", ["lars", "sgd"])
def test_linear_probe_agrees_with_logistic_regression(gen, optimizer):
    train_x, train_y, centres = _blobs(gen, 2000, 5, 16, spread=1.2)
    val_x, val_y, _ = _blobs(gen, 400, 5, 16, spread=1.2, centres=centres)
    scale = torch.rand(16, generator=gen, dtype=torch.float64) * 20 + 0.5
    offset = torch.randn(16, generator=gen, dtype=torch.float64) * 30
    train_x, val_x = train_x * scale + offset, val_x * scale + offset
    probe = ev.linear_probe(train_x.float(), train_y, val_x.float(), val_y, 5, optimizer=optimizer, seed=1)
    scaler = StandardScaler().fit(train_x.numpy())
    oracle = LogisticRegression(max_iter=2000).fit(scaler.transform(train_x.numpy()), train_y.numpy())
    expected = 100 * oracle.score(scaler.transform(val_x.numpy()), val_y.numpy())
    assert 80 < expected < 99.5  # easy, but not so easy that any classifier would do
    assert abs(probe["top1"] - expected) <= 2.5, (probe, expected)
    # 2000 features, batch 256: 7 full batches and one of 208 per epoch, epochs enough for MAE's 7,020 steps
    assert (probe["epochs"], probe["steps"]) == (878, 7024)
    assert probe["warmup_epochs"] == pytest.approx(878 / 9)
    assert probe["lr"] == pytest.approx(6.4 if optimizer == "lars" else 0.1)


def test_linear_probe_is_deterministic_from_seed(gen):
    train_x, train_y, centres = _blobs(gen, 200, 3, 8, spread=1.5)
    val_x, val_y, _ = _blobs(gen, 100, 3, 8, spread=1.5, centres=centres)
    args = (train_x.float(), train_y, val_x.float(), val_y, 3)
    a = ev.linear_probe(*args, epochs=5, seed=3)
    b = ev.linear_probe(*args, epochs=5, seed=3)
    c = ev.linear_probe(*args, epochs=5, seed=4)
    assert a == b
    assert a["final_loss"] != c["final_loss"]


def test_linear_probe_leaves_global_rng_alone(gen):
    x, y, _ = _blobs(gen, 50, 2, 4, spread=1.0)
    before = torch.get_rng_state()
    ev.linear_probe(x.float(), y, x.float(), y, 2, epochs=2)
    assert torch.equal(before, torch.get_rng_state())


# --------------------------------------------------------------------------------------------
# digits


def test_digits_split_is_stratified_disjoint_and_complete():
    from sklearn.datasets import load_digits

    target = load_digits().target
    train, val = ev._digits_split("train"), ev._digits_split("val")
    assert not set(train) & set(val)
    assert sorted(train + val) == list(range(len(target)))
    for label in range(10):
        n_val, n_all = int((target[val] == label).sum()), int((target == label).sum())
        assert n_val == n_all // 4  # every fourth image of the class
    assert (len(train), len(val)) == (1352, 445)


def test_written_digits_are_the_in_memory_ones(tmp_path):
    root = ev.write_digits_imagefolder(tmp_path / "digits", img_size=24, limit_per_class=3)
    memory = ev.DigitsDataset("val", img_size=24, limit_per_class=3)
    files = sorted((root / "val").glob("*/*.png"), key=lambda p: int(p.stem))
    assert len(files) == len(memory) == 30
    for path, i in zip(files, range(len(memory))):
        img, label = memory[i]
        assert path.parent.name == str(label)
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(img))
        assert img.size == (24, 24)


# --------------------------------------------------------------------------------------------
# checkpoints and the command line


def _write_checkpoint(path: Path, size: str = "tiny", weights_of: str | None = None, seed: int = 0) -> Path:
    """A checkpoint laid out as evomask-pretrain writes it (its own parser gives the saved args)."""
    args = pretrain_parser().parse_args(["--model", size, "--img-size", "32", "--patch-size", "8", "--mask", "random"])
    torch.manual_seed(seed)
    model = build_mae(weights_of or size, img_size=32, patch_size=8)
    saved = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    save_atomic({"model": model.state_dict(), "step": 7, "epoch": 1.0, "args": json.dumps(saved)}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _write_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint-00000007.pt")


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    return ev.write_digits_imagefolder(tmp_path_factory.mktemp("digits"), img_size=32, limit_per_class=PER_CLASS)


def _stopped(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        ev.main(argv)
    assert info.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[evomask] stopped: "), err
    return err[0]


def test_bad_data_folders_stop_with_one_line(capsys, tmp_path, checkpoint, digits_dir):
    line = _stopped(capsys, ["--checkpoint", str(checkpoint), "--data", str(tmp_path / "nowhere")])
    assert "--data" in line and "does not exist" in line

    only_train = tmp_path / "only_train"
    (only_train / "train" / "a").mkdir(parents=True)
    line = _stopped(capsys, ["--checkpoint", str(checkpoint), "--data", str(only_train)])
    assert "val/ missing" in line

    def tree(root: Path, train: list[str], val: list[str]) -> Path:
        png = next((digits_dir / "train" / "0").glob("*.png"))
        for split, classes in (("train", train), ("val", val)):
            for c in classes:
                (root / split / c).mkdir(parents=True)
                (root / split / c / "x.png").write_bytes(png.read_bytes())
        return root

    line = _stopped(capsys, ["--checkpoint", str(checkpoint), "--data", str(tree(tmp_path / "t1", ["a", "b"], ["a"]))])
    assert "class(es) b of train/ missing from val/" in line
    line = _stopped(capsys, ["--checkpoint", str(checkpoint), "--data", str(tree(tmp_path / "t2", ["a"], ["a", "c"]))])
    assert "class(es) c of val/ missing from train/" in line

    empty_class = tree(tmp_path / "t3", ["a", "b"], ["a"])
    (empty_class / "val" / "b").mkdir()
    line = _stopped(capsys, ["--checkpoint", str(checkpoint), "--data", str(empty_class)])
    assert "--data" in line and "classes b" in line


def test_bad_checkpoints_stop_with_one_line(capsys, tmp_path, checkpoint):
    line = _stopped(capsys, ["--checkpoint", str(tmp_path / "missing.pt")])
    assert "--checkpoint" in line and "does not exist" in line

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    line = _stopped(capsys, ["--checkpoint", str(garbage)])
    assert "unreadable or corrupt" in line

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoint.read_bytes()[:5000])
    assert "unreadable or corrupt" in _stopped(capsys, ["--checkpoint", str(truncated)])

    line = _stopped(capsys, ["--checkpoint", str(checkpoint), "--model", "small"])
    assert "ViT-tiny" in line and "--model small" in line

    # saved arguments say tiny, the weights are a ViT-small's
    mismatched = _write_checkpoint(tmp_path / "mismatched.pt", size="tiny", weights_of="small")
    line = _stopped(capsys, ["--checkpoint", str(mismatched)])
    assert "do not fit the ViT-tiny" in line and "of another shape (first: cls_token is [1, 1, 384] in the file, [1, 1, 192] in the model)" in line

    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    assert "no readable checkpoint" in _stopped(capsys, ["--checkpoint", str(empty_run)])


def test_bad_options_stop_with_one_line(capsys, checkpoint, digits_dir):
    line = _stopped(capsys, ["--checkpoint", str(checkpoint), "--data", str(digits_dir), "--knn-k", "61"])
    assert "--knn-k 61" in line and "[1, 60]" in line
    if not torch.cuda.is_available():
        line = _stopped(capsys, ["--checkpoint", str(checkpoint), "--device", "cuda"])
        assert "--device cuda" in line
    line = _stopped(capsys, ["--checkpoint", str(checkpoint), "--device", "gpu"])
    assert "--device 'gpu' is not a device (auto, cpu, cuda or cuda:K)" in line


def test_end_to_end_knn_matches_sklearn_on_the_extracted_features(checkpoint, digits_dir, capsys, tmp_path):
    out = tmp_path / "knn.json"
    ev.main(["--checkpoint", str(checkpoint), "--data", str(digits_dir), "--protocol", "knn",
             "--device", "cpu", "--output-json", str(out)])
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(out.read_text())
    assert json.loads(printed) == result
    assert {"protocol", "top1", "top5", "num_train", "num_val", "checkpoint", "feature"} <= set(result)
    assert (result["protocol"], result["feature"], result["num_train"], result["num_val"]) == ("knn", "cls", 60, 60)
    assert result["checkpoint"] == str(checkpoint)

    model, info = ev.load_encoder(checkpoint)
    data = ev.load_eval_data(digits_dir, info["img_size"])
    train_x, train_y = ev.extract_features(model, data.train, progress=False)
    val_x, val_y = ev.extract_features(model, data.val, progress=False)
    assert train_x.shape == (60, 192) and torch.isfinite(train_x).all()
    oracle = _sklearn_knn(20, 0.07).fit(train_x.double().numpy(), train_y.numpy())
    assert result["top1"] == pytest.approx(100 * oracle.score(val_x.double().numpy(), val_y.numpy()))


def test_end_to_end_linear_is_deterministic_and_folder_equals_memory(checkpoint, digits_dir, capsys):
    argv = ["--checkpoint", str(checkpoint), "--protocol", "linear", "--device", "cpu", "--linear-epochs", "20",
            "--seed", "5"]
    ev.main(argv + ["--data", str(digits_dir)])
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ev.main(argv + ["--data", str(digits_dir)])
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first == second
    assert first["settings"]["steps"] == 20 and first["settings"]["optimizer"] == "lars"  # 60 features: 1 step/epoch
    in_memory = ev.evaluate_checkpoint(checkpoint, "digits", "linear", device="cpu", seed=5, progress=False,
                                       linear={"epochs": 20}, limit_per_class=PER_CLASS)
    assert in_memory["top1"] == first["top1"] and in_memory["top5"] == first["top5"]


def test_avg_feature_is_the_mean_patch_token(checkpoint):
    model, _ = ev.load_encoder(checkpoint)
    imgs = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    tokens = model.embed(ev._normalise(imgs))
    with torch.no_grad():
        x = tokens
        for block in model.blocks:
            x = block(x)
        x = model.norm(x)
    torch.testing.assert_close(ev.encode(model, imgs, "cls"), x[:, 0])
    torch.testing.assert_close(ev.encode(model, imgs, "avg"), x[:, 1:].mean(1))


def test_knn_monitor_equals_the_cli_and_leaves_training_untouched(checkpoint):
    model, _ = ev.load_encoder(checkpoint)
    model.train()
    rng = torch.get_rng_state()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    top1 = ev.knn_monitor(model, "digits", "cpu", limit_per_class=PER_CLASS)
    again = ev.knn_monitor(model, "digits", "cpu", limit_per_class=PER_CLASS)  # from the cached images
    assert model.training
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    expected = ev.evaluate_checkpoint(checkpoint, "digits", "knn", device="cpu", progress=False,
                                      limit_per_class=PER_CLASS)
    assert top1 == again == expected["top1"]


def test_knn_monitor_names_the_trainer_flag(checkpoint, tmp_path):
    model, _ = ev.load_encoder(checkpoint)
    with pytest.raises(ev.EvaluationStopped, match=r"^--eval-data .*nowhere.* does not exist"):
        ev.knn_monitor(model, tmp_path / "nowhere")
    with pytest.raises(ev.EvaluationStopped, match=r"^--eval-data digits: the k-NN's k = 61 must be in \[1, 60\]"):
        ev.knn_monitor(model, "digits", k=61, limit_per_class=PER_CLASS)
