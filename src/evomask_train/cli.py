"""Entry points of the console scripts ``evomask-pretrain``, ``evomask-eval`` and ``evomask-demo``.

The trainer and the demo need packages that a plain ``pip install evomask`` does not bring (the
``train`` extra: timm, torchvision, matplotlib, ...), and train.py imports some of them at its top.
These wrappers check for them first, so that a torch-only environment gets one line saying what to
install, and exit status 3, instead of a ModuleNotFoundError traceback. Status 3 is the trainer's
and the evaluator's own for a run that cannot go on (a diverged model, a full disk, unusable data).
"""

from __future__ import annotations

import importlib.util
import sys

#: The extra to install for the scripts, as pip spells it.
TRAIN_EXTRA = 'pip install "evomask[train]"'

#: Exit status when a needed package is missing (the trainer's status for a run that cannot go on).
EXIT_MISSING_EXTRA = 3

# Import names (not distribution names) of what each script needs before it can do anything.
# tensorboard is left out: the trainer writes metrics.csv without it.
PRETRAIN_MODULES = ("timm", "torchvision", "tqdm", "matplotlib", "skimage", "PIL")
DEMO_MODULES = ("matplotlib", "skimage")
# sklearn: the default evaluation data are its embedded digits.
EVAL_MODULES = ("timm", "torchvision", "tqdm", "PIL", "sklearn")
_NOT_THE_EXTRA = frozenset({"torch", "numpy", "evomask_ext", "evomask_train"})


def missing_modules(names: tuple[str, ...]) -> list[str]:
    """The top-level modules of ``names`` that cannot be imported here (found without importing)."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken half-installed package, or a blocked module
            found = False
        if not found:
            missing.append(name)
    return missing


def _stop_missing(script: str, missing: list[str]) -> None:
    print(
        f"{script}: missing {', '.join(missing)} (the [train] extra); install it with: {TRAIN_EXTRA}",
        file=sys.stderr,
        flush=True,
    )
    raise SystemExit(EXIT_MISSING_EXTRA)


def _run(script: str, modules: tuple[str, ...], module: str, argv: list[str] | None) -> None:
    missing = missing_modules(modules)
    if missing:
        _stop_missing(script, missing)
    try:
        main = importlib.import_module(module).main
    except ModuleNotFoundError as exc:
        # A package of the extra that the list above does not name yet. The core dependencies and
        # evomask itself are not the extra's: their absence is a broken install, shown as is.
        top = (exc.name or "").split(".", 1)[0]
        if not top or top in _NOT_THE_EXTRA:
            raise
        _stop_missing(script, [top])
    main(argv)


def pretrain(argv: list[str] | None = None) -> None:
    """``evomask-pretrain``: :func:`evomask_train.train.main` once the [train] extra is there."""
    _run("evomask-pretrain", PRETRAIN_MODULES, "evomask_train.train", argv)


def evaluate(argv: list[str] | None = None) -> None:
    """``evomask-eval``: :func:`evomask_train.evaluate.main` once the [train] extra is there."""
    _run("evomask-eval", EVAL_MODULES, "evomask_train.evaluate", argv)


def demo(argv: list[str] | None = None) -> None:
    """``evomask-demo``: :func:`evomask_train.demo.main` once its packages are there."""
    _run("evomask-demo", DEMO_MODULES, "evomask_train.demo", argv)
