"""The console scripts in an environment without the [train] extra: one line, exit status 3.

``evomask-pretrain``, ``evomask-eval`` and ``evomask-demo`` run through ``evomask_train.cli``, which checks for the
extra's packages before the trainer's top-level imports. A package is made "missing" in a child
Python by ``sys.modules[name] = None``: importing it then raises ModuleNotFoundError and
``importlib.util.find_spec`` finds nothing, as in a venv where it was never installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import evomask_train
from evomask_train import cli

ROOT = Path(__file__).resolve().parents[1]


def run_script(
    cwd: Path, entry: str, blocked: list[str], args: list[str], prelude: str = ""
) -> subprocess.CompletedProcess:
    """Runs ``evomask_train.cli.<entry>`` in a child Python with ``blocked`` modules missing.

    The child runs in ``cwd`` (a temporary folder): ``python -c`` puts the working folder first on
    sys.path, and from the repository root that would import the unbuilt source tree."""
    code = textwrap.dedent(
        f"""
        import sys
        for name in {blocked!r}:
            sys.modules[name] = None
        sys.argv = ["evomask-{entry}"] + {args!r}
        from evomask_train import cli
        {prelude}
        cli.{entry}()
        """
    )
    env = dict(os.environ)
    package_parent = str(Path(evomask_train.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def assert_one_line_stop(done: subprocess.CompletedProcess, missing: str) -> None:
    assert done.returncode == cli.EXIT_MISSING_EXTRA == 3, (done.returncode, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert missing in lines[0]
    assert 'pip install "evomask[train]"' in lines[0]


def test_pretrain_without_timm_says_which_extra(tmp_path):
    assert_one_line_stop(run_script(tmp_path, "pretrain", ["timm"], ["--epochs", "1"]), "timm")


def test_demo_without_matplotlib_says_which_extra(tmp_path):
    assert_one_line_stop(run_script(tmp_path, "demo", ["matplotlib"], []), "matplotlib")


def test_eval_without_sklearn_says_which_extra(tmp_path):
    assert_one_line_stop(run_script(tmp_path, "evaluate", ["sklearn"], ["--protocol", "knn"]), "sklearn")


def test_pretrain_names_every_missing_package(tmp_path):
    done = run_script(tmp_path, "pretrain", ["timm", "torchvision"], [])
    assert_one_line_stop(done, "timm")
    assert "torchvision" in done.stderr


def test_a_missing_package_the_list_does_not_name_stops_the_same_way(tmp_path):
    # The trainer's own import of timm fails, after the up-front check has been emptied.
    done = run_script(tmp_path, "pretrain", ["timm"], [], prelude="cli.PRETRAIN_MODULES = ()")
    assert_one_line_stop(done, "timm")


def test_the_console_scripts_point_at_the_checking_wrappers():
    tomllib = pytest.importorskip("tomllib")
    pyproject = ROOT / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("no pyproject.toml beside the tests")
    scripts = tomllib.loads(pyproject.read_text())["project"]["scripts"]
    assert scripts == {
        "evomask-pretrain": "evomask_train.cli:pretrain",
        "evomask-eval": "evomask_train.cli:evaluate",
        "evomask-demo": "evomask_train.cli:demo",
    }


def test_pretrain_with_the_extra_reaches_the_trainer(capsys):
    for name in cli.PRETRAIN_MODULES:
        pytest.importorskip(name)
    with pytest.raises(SystemExit) as stop:
        cli.pretrain(["--help"])
    assert stop.value.code == 0
    assert "--mask" in capsys.readouterr().out
