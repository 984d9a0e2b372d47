"""Benchmark suite: every evomask op on every available backend, next to the anchors.

Backends (each where it can run): ``cuda`` (compiled kernel), ``cuda-warp`` (the trees with
``EVOMASK_CUDA_TREE=warp``: one warp per image), ``reference-cuda`` (the pure-PyTorch
reference on the GPU), ``cpu`` (compiled kernel, all threads), ``cpu-1t`` (compiled kernel, one
thread), ``reference-cpu``; anchors on the same inputs: scipy ``linkage``, ``fastcluster``,
scikit-learn ``GaussianMixture``, a plain Python-loop average linkage and, for ``vmf_kmeans`` (the
EPM authors' released clustering, ``--ops vmf_kmeans``), the released EM as plain float32 PyTorch
(``torch-loop-cpu`` / ``torch-loop-cuda``).

Timing: warm-up, then the median of repeated runs (CUDA events on the GPU, ``perf_counter``
otherwise). Backends too slow for a case run on a sub-batch and are scaled linearly to the full
batch (marked ``extrapolated``); the per-image anchors are loops over images, so that scaling is
exact up to noise. Prints a table, writes ``<out>.json`` and ``<out>.png`` (latency vs N).

    python bench/bench_ops.py                      # full suite
    python bench/bench_ops.py --quick              # a small subset, for a smoke run
    python bench/bench_ops.py --ops gmm_em --batches 1 64 256 --sizes 196
    python bench/bench_ops.py --ops vmf_kmeans --components 12 40   # N = D = 196, 15 rounds
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import evomask_ext
from evomask_ext import _loader, reference

def compiled(op: str, backend: str) -> bool:
    return _loader.kernel_sources()[op][backend] == "compiled"


# Speed-ups are reported against the reference on the same device.
REFERENCE_OF = {"cuda": "reference-cuda", "cuda-warp": "reference-cuda", "cpu": "reference-cpu", "cpu-1t": "reference-cpu"}
# The warp-per-image CUDA tree kernel (csrc/cuda/tree_warp_kernel.cu), timed next to the default.
WARP_TREE = {"EVOMASK_CUDA_TREE": "warp"}


# ---------------------------------------------------------------------------------------------
# inputs


def attention_like(batch: int, n: int, seed: int, device: str) -> torch.Tensor:
    """Row-softmax of random logits with a few planted groups: looks like ViT attention."""
    gen = torch.Generator().manual_seed(seed)
    groups = torch.randint(0, max(2, n // 16), (batch, n), generator=gen)
    logits = torch.randn(batch, n, n, generator=gen) + 2.0 * (groups[:, :, None] == groups[:, None, :])
    return logits.softmax(-1).to(device)


#: N -> a bank of maps from a trained encoder (``--checkpoint``): the "trained" input family.
TRAINED: dict[int, torch.Tensor] = {}


def tree_inputs(batch: int, n: int, seed: int, device: str) -> torch.Tensor:
    """The maps the tree ops are timed on: a trained encoder's (``TRAINED``, repeated to ``batch``)
    when ``--checkpoint`` gave one of this N, else :func:`attention_like`."""
    bank = TRAINED.get(n)
    if bank is None:
        return attention_like(batch, n, seed, device)
    reps = -(-batch // bank.shape[0])
    return bank.repeat(reps, 1, 1)[:batch].contiguous().to(device)


def gmm_inputs(batch: int, n: int, k: int, seed: int, device: str):
    x = attention_like(batch, n, seed, "cpu")
    gen = torch.Generator().manual_seed(seed + 1)
    rows = torch.rand(batch, n, generator=gen).argsort(-1)[:, :k]
    init = torch.gather(x, 1, rows[..., None].expand(batch, k, n))
    return x.to(device), init.to(device)


# ---------------------------------------------------------------------------------------------
# anchors


def condensed_distances(sim: np.ndarray) -> np.ndarray:
    """scipy's condensed distance vector of ``max(sym) - sym``: same merge order as the similarity."""
    sym = 0.5 * (sim + sim.T)
    dist = sym.max() - sym
    iu = np.triu_indices(sim.shape[0], 1)
    return np.ascontiguousarray(dist[iu], dtype=np.float64)


def python_loop_linkage(sim: list[list[float]]) -> list[tuple[int, int]]:
    """Average linkage in plain Python lists, O(N^3): what a user without the extension writes."""
    n = len(sim)
    d = [[0.5 * (sim[i][j] + sim[j][i]) for j in range(n)] for i in range(n)]
    size = [1] * n
    alive = list(range(n))
    merges = []
    for _ in range(n - 1):
        best, pair = -math.inf, (0, 0)
        for ia, a in enumerate(alive):
            row = d[a]
            for b in alive[ia + 1 :]:
                if row[b] > best:
                    best, pair = row[b], (a, b)
        a, b = pair
        for c in alive:
            if c != a and c != b:
                v = (size[a] * d[a][c] + size[b] * d[b][c]) / (size[a] + size[b])
                d[a][c] = d[c][a] = v
        size[a] += size[b]
        alive.remove(b)
        merges.append(pair)
    return merges


# ---------------------------------------------------------------------------------------------
# timing


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: str, min_time: float, max_reps: int) -> list[float]:
    """Seconds per call: warm-up, then repeats until ``min_time`` has passed or ``max_reps``."""
    fn()
    _sync(device)
    times: list[float] = []
    total = 0.0
    while len(times) < max_reps and (total < min_time or len(times) < 3):
        if device == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            t = start.elapsed_time(stop) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            t = time.perf_counter() - t0
        times.append(t)
        total += t
        if t > min_time and len(times) >= 1 and total > 4 * min_time:
            break
    return times


class Case:
    """One (op, backend) callable on a batch; ``batched`` ones take the whole batch at once."""

    def __init__(
        self,
        backend: str,
        device: str,
        make: Callable[[int], Callable[[], object]],
        threads: int | None = None,
        env: dict[str, str] | None = None,
    ):
        self.backend, self.device, self.make, self.threads, self.env = backend, device, make, threads, env or {}


def run_case(case: Case, batch: int, estimate: float | None, budget: float, min_time: float, max_reps: int):
    """Time ``case`` on ``batch`` images; shrink to a sub-batch when the estimate exceeds the budget."""
    sub = batch
    if estimate is not None and estimate > budget:
        sub = max(1, int(batch * budget / estimate))
    prev_threads = torch.get_num_threads()
    prev_env = {name: os.environ.get(name) for name in case.env}
    if case.threads is not None:
        torch.set_num_threads(case.threads)
    os.environ.update(case.env)
    try:
        fn = case.make(sub)
        times = time_call(fn, case.device, min_time, max_reps)
    finally:
        torch.set_num_threads(prev_threads)
        for name, value in prev_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    median = statistics.median(times) * batch / sub
    return {"ms": median * 1e3, "reps": len(times), "sub_batch": sub, "extrapolated": sub != batch}


# ---------------------------------------------------------------------------------------------
# the cases per op


def linkage_cases(n: int, devices: list[str], seed: int, max_python_n: int) -> list[Case]:
    cases = []
    op = torch.ops.evomask.linkage_tree
    for device in devices:
        tag = "cuda" if device == "cuda" else "cpu"
        if compiled("linkage_tree", tag.upper()):
            cases.append(Case(tag, device, lambda b, d=device: (lambda s=tree_inputs(b, n, seed, d): op(s))))
            if device == "cpu":
                cases.append(Case("cpu-1t", device, lambda b: (lambda s=tree_inputs(b, n, seed, "cpu"): op(s)), threads=1))
            else:
                cases.append(
                    Case("cuda-warp", device, lambda b, d=device: (lambda s=tree_inputs(b, n, seed, d): op(s)), env=WARP_TREE)
                )
        cases.append(
            Case(f"reference-{tag}", device, lambda b, d=device: (lambda s=tree_inputs(b, n, seed, d): reference.linkage_tree(s)))
        )
    try:
        from scipy.cluster.hierarchy import linkage as scipy_linkage

        def scipy_make(b):
            dists = [condensed_distances(s) for s in tree_inputs(b, n, seed, "cpu").numpy()]
            return lambda: [scipy_linkage(c, method="average") for c in dists]

        cases.append(Case("scipy", "cpu", scipy_make, threads=1))
    except ImportError:
        pass
    try:
        import fastcluster

        def fastcluster_make(b):
            dists = [condensed_distances(s) for s in tree_inputs(b, n, seed, "cpu").numpy()]
            return lambda: [fastcluster.linkage(c, method="average") for c in dists]

        cases.append(Case("fastcluster", "cpu", fastcluster_make, threads=1))
    except ImportError:
        pass
    if n <= max_python_n:

        def python_make(b):
            sims = [s.tolist() for s in tree_inputs(b, n, seed, "cpu")]
            return lambda: [python_loop_linkage(s) for s in sims]

        cases.append(Case("python-loop", "cpu", python_make, threads=1))
    return cases


def hier_mask_cases(n: int, devices: list[str], seed: int, ratio: float = 0.75, progress: float = 0.5) -> list[Case]:
    cases = []
    op = torch.ops.evomask.hier_mask
    for device in devices:
        tag = "cuda" if device == "cuda" else "cpu"

        def inputs(b, d=device):
            return tree_inputs(b, n, seed, d), torch.rand(b, n, generator=torch.Generator().manual_seed(seed)).to(d)

        if compiled("hier_mask", tag.upper()):
            cases.append(Case(tag, device, lambda b, inputs=inputs: (lambda a=inputs(b): op(a[0], a[1], ratio, progress))))
            if device == "cpu":
                cases.append(
                    Case("cpu-1t", device, lambda b, inputs=inputs: (lambda a=inputs(b): op(a[0], a[1], ratio, progress)), threads=1)
                )
            else:
                cases.append(
                    Case("cuda-warp", device, lambda b, inputs=inputs: (lambda a=inputs(b): op(a[0], a[1], ratio, progress)), env=WARP_TREE)
                )
        cases.append(
            Case(
                f"reference-{tag}",
                device,
                lambda b, inputs=inputs: (lambda a=inputs(b): reference.hier_mask(a[0], a[1], ratio, progress)),
            )
        )
    return cases


def gmm_cases(n: int, k: int, iters: int, devices: list[str], seed: int, reg: float = 1e-6) -> list[Case]:
    cases = []
    op = torch.ops.evomask.gmm_em
    for device in devices:
        tag = "cuda" if device == "cuda" else "cpu"
        if compiled("gmm_em", tag.upper()):
            make = lambda b, d=device: (lambda a=gmm_inputs(b, n, k, seed, d): op(a[0], a[1], iters, reg))
            cases.append(Case(tag, device, make))
            if device == "cpu":
                cases.append(Case("cpu-1t", device, make, threads=1))
        cases.append(
            Case(
                f"reference-{tag}",
                device,
                lambda b, d=device: (lambda a=gmm_inputs(b, n, k, seed, d): reference.gmm_em(a[0], a[1], iters, reg)),
            )
        )
    try:
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.mixture import GaussianMixture

        def sklearn_make(b):
            x, init = gmm_inputs(b, n, k, seed, "cpu")
            xs, inits = x.double().numpy(), init.double().numpy()

            def fit_all():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    for xb, ib in zip(xs, inits):
                        GaussianMixture(
                            k,
                            covariance_type="diag",
                            tol=0,
                            max_iter=iters,
                            reg_covar=reg,
                            means_init=ib,
                            weights_init=np.full(k, 1 / k),
                            precisions_init=np.tile(1 / (xb.var(0) + reg), (k, 1)),
                        ).fit(xb)

            return fit_all

        cases.append(Case("sklearn", "cpu", sklearn_make, threads=1))
    except ImportError:
        pass
    return cases


def vmf_inputs(batch: int, n: int, k: int, seed: int, device: str):
    """The released EPM call: points are the attention's columns at the scale of a sum over 144
    maps (ViT-B's 12 blocks x 12 heads), the N(0, 2 / K) start shared by the batch."""
    x = (attention_like(batch, n, seed, "cpu") * 144).transpose(1, 2).contiguous()
    start = torch.randn(k, n, generator=torch.Generator().manual_seed(seed + 1)) * math.sqrt(2.0 / k)
    return x.to(device), start[None].expand(batch, k, n).contiguous().to(device)


def torch_loop_vmf(x: torch.Tensor, init: torch.Tensor, iters: int, kappa: float = 40.0):
    """The released EM as plain float32 PyTorch (bmm, softmax), for the op to be timed against."""
    mu = init / (1e-6 + init.norm(dim=-1, keepdim=True))
    for _ in range(iters):
        z = torch.softmax(kappa * x @ mu.transpose(1, 2), dim=-1)
        mu = z.transpose(1, 2) @ x / (1e-6 + z.sum(1))[..., None]
        mu = mu / (1e-6 + mu.norm(dim=-1, keepdim=True))
    return torch.softmax(kappa * x @ mu.transpose(1, 2), dim=-1), mu


def vmf_cases(n: int, k: int, iters: int, devices: list[str], seed: int, kappa: float = 40.0) -> list[Case]:
    cases = []
    op = torch.ops.evomask.vmf_kmeans
    for device in devices:
        tag = "cuda" if device == "cuda" else "cpu"
        if compiled("vmf_kmeans", tag.upper()):
            make = lambda b, d=device: (lambda a=vmf_inputs(b, n, k, seed, d): op(a[0], a[1], iters, kappa))
            cases.append(Case(tag, device, make))
            if device == "cpu":
                cases.append(Case("cpu-1t", device, make, threads=1))
        cases.append(
            Case(
                f"reference-{tag}",
                device,
                lambda b, d=device: (lambda a=vmf_inputs(b, n, k, seed, d): reference.vmf_kmeans(a[0], a[1], iters, kappa)),
            )
        )
        cases.append(
            Case(
                f"torch-loop-{tag}",
                device,
                lambda b, d=device: (lambda a=vmf_inputs(b, n, k, seed, d): torch_loop_vmf(a[0], a[1], iters, kappa)),
            )
        )
    return cases


# ---------------------------------------------------------------------------------------------


def environment() -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        commit = ""
    env = {
        "date": dt.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "compiled": _loader.COMPILED,
        "commit": commit,
        "command": " ".join([Path(sys.executable).name] + sys.argv),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def print_table(rows: list[dict]) -> None:
    header = f"{'op':<13}{'config':<22}{'backend':<16}{'ms':>11}{'ms/img':>10}{'vs ref':>9}{'vs anchor':>11}"
    print(header)
    print("-" * len(header))
    for r in rows:
        ref = f"{r['speedup_vs_reference']:.1f}x" if r.get("speedup_vs_reference") else ""
        anc = f"{r['speedup_vs_anchor']:.1f}x" if r.get("speedup_vs_anchor") else ""
        mark = "*" if r["extrapolated"] else " "
        print(
            f"{r['op']:<13}{r['config']:<22}{r['backend']:<16}{r['ms']:>10.3f}{mark}{r['ms'] / r['batch']:>10.4f}{ref:>9}{anc:>11}"
        )
    print("* measured on a sub-batch and scaled linearly to the batch")


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    ops = sorted({r["op"] for r in rows})
    fig, axes = plt.subplots(1, len(ops), figsize=(5.5 * len(ops), 4.2), squeeze=False)
    for ax, op in zip(axes[0], ops):
        sub = [r for r in rows if r["op"] == op]
        batch = max(r["batch"] for r in sub)
        ks = sorted({r.get("k") for r in sub if r.get("k") is not None})
        if ks:
            sub = [r for r in sub if r.get("k") == ks[-1]]
        for backend in sorted({r["backend"] for r in sub}):
            pts = sorted((r["n"], r["ms"]) for r in sub if r["backend"] == backend and r["batch"] == batch)
            if len(pts) >= 1:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=backend)
        title = f"{op}, B={batch}" + (f", K={ks[-1]}" if ks else "")
        ax.set(xscale="log", yscale="log", xlabel="N (patches)", ylabel="latency per batch [ms]", title=title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


ANCHOR_OF = {"linkage_tree": "fastcluster", "gmm_em": "sklearn"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", default=["linkage_tree", "hier_mask", "gmm_em"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64, 256])
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 196, 576, 1024], help="N (patches)")
    parser.add_argument("--components", nargs="+", type=int, default=[10, 40], help="K for gmm_em")
    parser.add_argument("--iters", type=int, default=10, help="EM iterations for gmm_em")
    parser.add_argument("--gmm-sizes", nargs="+", type=int, default=[196], help="N = D for gmm_em and vmf_kmeans")
    parser.add_argument("--vmf-iters", type=int, default=15, help="rounds for vmf_kmeans (--ops vmf_kmeans; K from --components)")
    parser.add_argument("--devices", nargs="+", default=None, help="cpu and/or cuda (default: all available)")
    parser.add_argument("--backends", nargs="+", default=None, help="only these backends")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds one timed call may take before sub-batching")
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds of repeats per case")
    parser.add_argument("--max-reps", type=int, default=50)
    parser.add_argument("--max-python-n", type=int, default=196, help="largest N for the Python-loop anchor")
    parser.add_argument("--quick", action="store_true", help="B in {1, 8}, N in {64, 196}: a smoke run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None,
                        help="an evomask-pretrain checkpoint (file or folder): time linkage_tree and hier_mask on its "
                             "encoder's attention (bench/trained_attention.py) at its N instead of --sizes")
    parser.add_argument("--out", type=Path, default=None, help="output stem (default bench/results/ops-<device>-<date>)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.sizes, args.gmm_sizes, args.components = [1, 8], [64, 196], [64], [10]
        args.min_time, args.budget = 0.05, 0.5
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    env = environment()
    if args.checkpoint:
        from trained_attention import trained_attention

        bank = trained_attention(args.checkpoint, 64, args.seed)
        TRAINED[bank.shape[1]] = bank
        args.sizes = [bank.shape[1]]
        env["tree_inputs"] = f"trained: {args.checkpoint} (N = {bank.shape[1]}, 64 maps)"
    if args.out is None:
        where = env.get("gpu", "cpu").replace(" ", "-") if "cuda" in devices else "cpu"
        args.out = Path(__file__).parent / "results" / f"ops-{where}-{env['date']}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(json.dumps(env))

    configs = []  # (op, n, k, cases)
    for op in args.ops:
        if op == "linkage_tree":
            configs += [(op, n, None, linkage_cases(n, devices, args.seed, args.max_python_n)) for n in args.sizes]
        elif op == "hier_mask":
            configs += [(op, n, None, hier_mask_cases(n, devices, args.seed)) for n in args.sizes]
        elif op == "gmm_em":
            configs += [
                (op, n, k, gmm_cases(n, k, args.iters, devices, args.seed)) for n in args.gmm_sizes for k in args.components
            ]
        elif op == "vmf_kmeans":
            configs += [
                (op, n, k, vmf_cases(n, k, args.vmf_iters, devices, args.seed)) for n in args.gmm_sizes for k in args.components
            ]
        else:
            parser.error(f"unknown op {op!r}")

    rows: list[dict] = []
    for op, n, k, cases in configs:
        for case in cases:
            if args.backends and case.backend not in args.backends:
                continue
            per_image = None  # seconds per image from the last batch, for the estimate
            for batch in sorted(args.batches):
                estimate = None if per_image is None else per_image * batch
                try:
                    result = run_case(case, batch, estimate, args.budget, args.min_time, args.max_reps)
                except torch.OutOfMemoryError:
                    print(f"{op} N={n} B={batch} {case.backend}: out of memory, skipped")
                    torch.cuda.empty_cache()
                    continue
                per_image = result["ms"] / 1e3 / batch
                iters = args.vmf_iters if op == "vmf_kmeans" else args.iters
                config = f"N={n} B={batch}" + (f" K={k} it={iters}" if k else "")
                rows.append({"op": op, "n": n, "k": k, "batch": batch, "backend": case.backend, "config": config, **result})
                print(f"  {op:<13}{config:<24}{case.backend:<16}{result['ms']:10.3f} ms", flush=True)

    by_key = {(r["op"], r["config"], r["backend"]): r for r in rows}
    for r in rows:
        ref = by_key.get((r["op"], r["config"], REFERENCE_OF.get(r["backend"], "")))
        if ref:
            r["speedup_vs_reference"] = ref["ms"] / r["ms"]
        anchor = by_key.get((r["op"], r["config"], ANCHOR_OF.get(r["op"], "")))
        if anchor and r["backend"] in ("cuda", "cuda-warp", "cpu", "cpu-1t"):
            r["speedup_vs_anchor"] = anchor["ms"] / r["ms"]
    print()
    print_table(rows)
    args.out.with_suffix(".json").write_text(json.dumps({"environment": env, "results": rows}, indent=1))
    print(f"wrote {args.out.with_suffix('.json')}")
    plot(rows, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
