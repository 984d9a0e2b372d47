"""Does an evolved mask give a better encoder? Every masking strategy at the same budget, side by side.

Each strategy pretrains with ``evomask-pretrain`` (a subprocess per run, on the embedded photos)
for every seed with the same model, data, schedule and number of steps; each final encoder is
then scored on the embedded digits by ``evomask-eval``'s k-NN (DINO: k 20, T 0.07) and linear
probe (MAE's recipe on cached features), with the same features for both. The encoder's initial
weights (the trainer's, from the same seeds) are scored too, as the floor pretraining must beat.

Output in ``--output-dir`` (default ``bench/results/compare-<date>``): ``results.md`` (mean ±
sample std over seeds per strategy, step time and masking share from each run's
``metrics.csv``), ``results.json`` (every run), ``accuracy.png``, ``knn_curves.png`` when the
trainer logs a ``knn_top1`` column, and ``runs/<strategy>-seed<k>/`` with the trainer's outputs.
Resumable: a finished run (``done.json``) or evaluation (``eval.json``) is not redone, and an
interrupted run continues from its newest checkpoint; a run folder made with other settings is
refused rather than mixed in.

    python bench/compare_masks.py                                    # 7 strategies x 3 seeds, 16 epochs
    python bench/compare_masks.py --strategies random ehm --seeds 0 --epochs 1 --output-dir /tmp/smoke
    python bench/compare_masks.py --output-dir bench/results/compare-2026-12-01   # resume that one
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from evomask_train import evaluate as ev
from evomask_train.model import build_mae

STRATEGIES = ("random", "block", "grid", "attn", "ehm", "epm", "selective")
INIT = "init"  # the row of the untrained encoders


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES), help="masking strategies")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one pretraining run per strategy and seed")
    g = p.add_argument_group("pretraining budget (the same for every run)")
    g.add_argument("--epochs", type=int, default=16, help="pretraining epochs (the README's main job)")
    g.add_argument("--dataset-length", type=int, default=128, help="embedded-photo crops per epoch")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--warmup-epochs", type=float, default=2)
    g.add_argument("--lr", type=float, default=1.5e-3, help="peak AdamW lr (the main job's; blr's 9.4e-6 barely moves a ViT-Ti)")
    g.add_argument("--model", default="tiny")
    g.add_argument("--img-size", type=int, default=64)
    g.add_argument("--patch-size", type=int, default=8)
    g.add_argument("--mask-ratio", type=float, default=0.75)
    g.add_argument("--train-args", default="", help="further evomask-pretrain flags for every run, one string")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-data", default=ev.DIGITS, help="'digits' or a folder with train/ and val/")
    g.add_argument("--feature", choices=["cls", "avg"], default="cls")
    g.add_argument("--knn-k", type=int, default=20)
    g.add_argument("--knn-temperature", type=float, default=0.07)
    g.add_argument("--linear-epochs", type=int, default=None, help="default: evomask-eval's (MAE's 7,020 steps)")
    g.add_argument("--eval-every", type=int, default=0,
                   help="k-NN monitor every this many epochs during pretraining, if the trainer has --eval-every (0: off)")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    g.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    g.add_argument("--output-dir", type=Path, default=None, help="default: bench/results/compare-<UTC date>")
    return p


# --------------------------------------------------------------------------------------------
# runs


def _train_flags(args, strategy: str, seed: int) -> list[str]:
    flags = ["--model", args.model, "--img-size", str(args.img_size), "--patch-size", str(args.patch_size),
             "--batch-size", str(args.batch_size), "--dataset-length", str(args.dataset_length),
             "--epochs", str(args.epochs), "--warmup-epochs", str(args.warmup_epochs), "--lr", str(args.lr),
             "--mask", strategy,
             "--mask-ratio", str(args.mask_ratio), "--seed", str(seed), "--device", args.device,
             "--log-every", "1", "--gallery-every", str(10**6), "--keep-checkpoints", "1"]
    if args.eval_every:
        flags += ["--eval-every", str(args.eval_every), "--eval-data", str(args.eval_data)]
    return flags + args.train_args.split()


def _env(args) -> dict:
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def _trainer_has(flag: str, env: dict) -> bool:
    out = subprocess.run([sys.executable, "-m", "evomask_train.train", "--help"], capture_output=True, text=True, env=env)
    return flag in out.stdout


def _fingerprint(flags: list[str]) -> str:
    return hashlib.sha256(json.dumps(flags).encode()).hexdigest()[:16]


def pretrain(args, strategy: str, seed: int, root: Path, env: dict) -> dict:
    """Runs (or resumes, or skips) one pretraining run; returns its done.json."""
    run = root / "runs" / f"{strategy}-seed{seed}"
    flags = _train_flags(args, strategy, seed)
    done = run / "done.json"
    if done.exists():
        record = json.loads(done.read_text())
        if record["fingerprint"] != _fingerprint(flags):
            theirs, ours = dict(zip(record["flags"][::2], record["flags"][1::2])), dict(zip(flags[::2], flags[1::2]))
            diff = ", ".join(f"{k} {theirs.get(k)} (now {ours.get(k)})" for k in sorted(set(theirs) | set(ours))
                             if theirs.get(k) != ours.get(k))
            raise SystemExit(f"{run} was pretrained with other settings: {diff or record['flags']}; use another --output-dir")
        return record
    run.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "evomask_train.train", *flags, "--output-dir", str(run), "--resume", "auto"]
    print(f"[compare] pretrain {strategy} seed {seed}: {' '.join(cmd[1:])}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"[compare] pretraining {strategy} seed {seed} failed (exit {proc.returncode}); see above")
    summary = next((json.loads(line.split("done: ", 1)[1]) for line in proc.stdout.splitlines() if "done: " in line), {})
    record = {"strategy": strategy, "seed": seed, "flags": flags, "fingerprint": _fingerprint(flags),
              "summary": summary, "wall_s": round(time.perf_counter() - started, 1)}
    done.write_text(json.dumps(record, indent=1) + "\n")
    return record


def _timings(metrics: Path) -> dict:
    """Median step and mask time over the logged steps after the first (warm-up) one."""
    with metrics.open() as f:
        rows = list(csv.DictReader(f))
    steps = [r for r in rows if r.get("step_ms")]
    body = steps[1:] or steps
    step_ms = statistics.median(float(r["step_ms"]) for r in body) if body else math.nan
    mask_ms = statistics.median(float(r["mask_ms"]) for r in body) if body else math.nan
    curve = [(int(r["epoch"]), float(r["knn_top1"])) for r in rows if r.get("knn_top1") not in (None, "")]
    last_loss = float(steps[-1]["loss"]) if steps else math.nan
    return {"step_ms": step_ms, "mask_ms": mask_ms, "mask_share": mask_ms / step_ms if step_ms else math.nan,
            "final_loss": last_loss, "knn_curve": curve}


# --------------------------------------------------------------------------------------------
# evaluation


class Evaluator:
    """k-NN and linear probe of an encoder on features extracted once (the images cached in memory)."""

    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.data = ev.load_eval_data(args.eval_data, args.img_size)
        self._images = None

    def images(self):
        if self._images is None:  # decoded once for every encoder of the comparison
            self._images = [tuple(torch.stack(v) if i == 0 else torch.tensor(v) for i, v in enumerate(zip(*split)))
                            for split in (self.data.train, self.data.val)]
        return self._images

    def __call__(self, model) -> dict:
        a = self.args
        (tx, ty), (vx, vy) = self.images()
        kw = dict(device=self.device, feature=a.feature, progress=True)
        ftrain, _ = ev.extract_features(model, (tx, ty), desc="train features", **kw)
        fval, _ = ev.extract_features(model, (vx, vy), desc="val features", **kw)
        classes = len(self.data.classes)
        knn = ev.topk_accuracy(ev.knn_classify(ftrain, ty, fval, classes, a.knn_k, a.knn_temperature), vy)
        linear = ev.linear_probe(ftrain, ty, fval, vy, classes, epochs=a.linear_epochs, seed=0, device=self.device)
        return {"knn_top1": knn["top1"], "knn_top5": knn["top5"], "linear_top1": linear["top1"],
                "linear_top5": linear["top5"], "num_train": len(ty), "num_val": len(vy)}


def _eval_settings(args) -> dict:
    return {"data": str(args.eval_data), "feature": args.feature, "k": args.knn_k, "T": args.knn_temperature,
            "linear_epochs": args.linear_epochs}


def evaluate_run(evaluator: Evaluator, args, run: Path, expected_step: int | None) -> dict:
    cached = run / "eval.json"
    if cached.exists():
        record = json.loads(cached.read_text())
        if record.get("settings") == _eval_settings(args):
            return record
    model, info = ev.load_encoder(run, evaluator.device)
    if expected_step is not None and info["step"] != expected_step:
        raise SystemExit(f"{info['path']} is at step {info['step']}, the run ended at {expected_step}")
    record = {**evaluator(model), "step": info["step"], "checkpoint": info["path"], "settings": _eval_settings(args)}
    cached.write_text(json.dumps(record, indent=1) + "\n")
    return record


def evaluate_init(evaluator: Evaluator, args, seed: int, root: Path) -> dict:
    """The trainer's initial encoder for ``seed`` (it seeds torch with the run's seed, then builds)."""
    cached = root / "runs" / f"{INIT}-seed{seed}.json"
    if cached.exists():
        record = json.loads(cached.read_text())
        if record.get("settings") == _eval_settings(args):
            return record
    torch.manual_seed(seed)
    model = build_mae(args.model, args.img_size, args.patch_size).to(evaluator.device)
    record = {**evaluator(model), "step": 0, "settings": _eval_settings(args)}
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(record, indent=1) + "\n")
    return record


# --------------------------------------------------------------------------------------------
# report


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def _pm(values: list[float], digits: int = 1) -> str:
    mean, std = _mean_std(values)
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if not math.isnan(std) else "")


def _pretraining_data(args) -> str:
    """What each epoch pretrains on: ``--data`` of ``--train-args`` if given, else the embedded photos."""
    flags = args.train_args.split()
    if "--data" in flags and flags.index("--data") + 1 < len(flags):
        return f"the images of {flags[flags.index('--data') + 1]} (no labels)"
    return f"{args.dataset_length} embedded-photo crops"


def report(args, root: Path, rows: list[dict]) -> None:
    order = [INIT] + list(args.strategies)
    by = {s: [r for r in rows if r["strategy"] == s] for s in order}
    lines = [
        f"# Masking strategies compared ({dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Pretraining: ViT-{args.model} MAE, {args.img_size} px, patch {args.patch_size}, mask ratio "
        f"{args.mask_ratio}, {args.epochs} epochs x {_pretraining_data(args)}, batch "
        f"{args.batch_size}, lr {args.lr}, warmup {args.warmup_epochs}, device {args.device}; seeds {args.seeds}. "
        f"Evaluation on {args.eval_data}: {rows[0]['num_train'] if rows else '?'} train / "
        f"{rows[0]['num_val'] if rows else '?'} val images, {args.feature} feature; k-NN k={args.knn_k}, "
        f"T={args.knn_temperature}; linear probe: MAE's recipe (LARS, lr 6.4, "
        f"{args.linear_epochs or 'enough'} epochs{'' if args.linear_epochs else ' for 7,020 steps'}) on cached features.",
        "",
        f"`{INIT}`: the trainer's initial weights for the same seeds (no pretraining). Mean ± sample std over seeds.",
        "",
        "| strategy | runs | k-NN top-1 % | linear top-1 % | final loss | step ms | mask ms | mask share |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    summary = {}
    for s in order:
        rs = by[s]
        if not rs:
            continue
        get = lambda key: [float(r.get(key, math.nan)) for r in rs]  # noqa: E731
        summary[s] = {k: dict(zip(("mean", "std"), _mean_std(get(k))))
                      for k in ("knn_top1", "linear_top1", "final_loss", "step_ms", "mask_ms", "mask_share")}
        share = _mean_std(get("mask_share"))[0]
        lines.append(
            f"| {s} | {len(rs)} | {_pm(get('knn_top1'))} | {_pm(get('linear_top1'))} | {_pm(get('final_loss'), 3)} "
            f"| {_pm(get('step_ms'), 0)} | {_pm(get('mask_ms'), 1)} | {'–' if math.isnan(share) else f'{100 * share:.1f} %'} |"
        )
    lines += ["", "Step and mask times: median over each run's logged steps after the first, then mean over seeds.", ""]
    (root / "results.md").write_text("\n".join(lines))
    (root / "results.json").write_text(json.dumps({"config": {k: (str(v) if isinstance(v, Path) else v)
                                                               for k, v in vars(args).items()},
                                                    "summary": summary, "runs": rows}, indent=1) + "\n")
    _plots(root, order, by)
    print("\n".join(lines), flush=True)


def _plots(root: Path, order: list[str], by: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [s for s in order if by[s]]
    fig, ax = plt.subplots(figsize=(1.2 * len(shown) + 2, 3.6))
    width = 0.38
    for j, (key, label) in enumerate((("knn_top1", "k-NN"), ("linear_top1", "linear probe"))):
        stats = [_mean_std([float(r[key]) for r in by[s]]) for s in shown]
        ax.bar([i + (j - 0.5) * width for i in range(len(shown))], [m for m, _ in stats], width,
               yerr=[0 if math.isnan(sd) else sd for _, sd in stats], capsize=3, label=label)
        for i, s in enumerate(shown):  # the single seeds, so a spread is visible with few of them
            ax.scatter([i + (j - 0.5) * width] * len(by[s]), [float(r[key]) for r in by[s]], s=8, color="k", zorder=3)
    ax.set_xticks(range(len(shown)), shown)
    ax.set_ylabel("val top-1 (%)")
    low = min(float(r[k]) for s in shown for r in by[s] for k in ("knn_top1", "linear_top1"))
    ax.set_ylim(max(0.0, 10 * math.floor(low / 10) - 10), 100)  # the strategies differ by points, not tens
    ax.set_title("val top-1 per masking strategy (mean ± std, dots: seeds)", fontsize=10)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(root / "accuracy.png", dpi=120)
    plt.close(fig)

    # k-NN during pretraining: per strategy the mean over seeds (band: ± sample std), from the
    # untrained encoder of each seed at epoch 0 to the last epoch.
    init = {r["seed"]: float(r["knn_top1"]) for r in by.get(INIT, [])}
    curves = {s: [[(0, init[r["seed"]])] * (r["seed"] in init) + list(map(tuple, r["knn_curve"]))
                  for r in by[s] if r.get("knn_curve")] for s in shown if s != INIT}
    if any(curves.values()):
        fig, ax = plt.subplots(figsize=(7.5, 3.8))
        for s, runs in curves.items():
            if not runs:
                continue
            epochs = sorted({e for run in runs for e, _ in run})
            stats = [_mean_std([acc for run in runs for e, acc in run if e == epoch]) for epoch in epochs]
            mean = [m for m, _ in stats]
            sd = [0.0 if math.isnan(v) else v for _, v in stats]
            color = f"C{shown.index(s)}"
            ax.plot(epochs, mean, color=color, marker="o", ms=3, label=f"{s} ({len(runs)} seeds)")
            ax.fill_between(epochs, [m - v for m, v in zip(mean, sd)], [m + v for m, v in zip(mean, sd)],
                            color=color, alpha=0.12, linewidth=0)
        ax.set_xlabel("pretraining epoch (0: the untrained encoder)")
        ax.set_ylabel("k-NN val top-1 (%)")
        ax.set_title("k-NN during pretraining (mean over seeds, band: ± std)", fontsize=10)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
        fig.tight_layout()
        fig.savefig(root / "knn_curves.png", dpi=120)
        plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    root = args.output_dir or Path("bench/results") / f"compare-{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}"
    root.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = _env(args)
    if args.eval_every and not _trainer_has("--eval-every", env):
        print("[compare] this evomask-pretrain has no --eval-every: no k-NN curves", flush=True)
        args.eval_every = 0
    device = torch.device(args.device)
    evaluator = None
    rows = []
    try:
        for seed in args.seeds:
            for strategy in args.strategies:
                record = pretrain(args, strategy, seed, root, env)
                evaluator = evaluator or Evaluator(args, device)
                run = root / "runs" / f"{strategy}-seed{seed}"
                result = evaluate_run(evaluator, args, run, record["summary"].get("step"))
                rows.append({"strategy": strategy, "seed": seed, **result, **_timings(run / "metrics.csv"),
                             "pretrain_wall_s": record["wall_s"]})
                print(f"[compare] {strategy} seed {seed}: k-NN {result['knn_top1']:.1f} %, "
                      f"linear {result['linear_top1']:.1f} %", flush=True)
            evaluator = evaluator or Evaluator(args, device)
            rows.append({"strategy": INIT, "seed": seed, **evaluate_init(evaluator, args, seed, root)})
    except ev.EvaluationStopped as exc:
        raise SystemExit(f"[compare] stopped: {exc}") from None
    report(args, root, rows)


if __name__ == "__main__":
    main(sys.argv[1:])
