"""The package as a new user meets it: imports from the repository root, the demo's command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Python started in the repository root finds the checkout's ``spread_optim/`` before any installed copy.
# An editable install also adds a finder that maps ``spread_optim.kernels`` to ``kernels/``; a plain
# ``pip install .`` does not. Dropping that finder reproduces what a non-editable install meets there.
WITHOUT_EDITABLE_FINDER = (
    "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower() "
    "and 'editable' not in getattr(f, '__module__', '').lower()]; "
)


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_kernels_import_from_the_repository_root_without_an_install_finder():
    code = WITHOUT_EDITABLE_FINDER + (
        "import spread_optim.kernels.reference as r, spread_optim.demo, spread_optim; "
        "assert 'kernels' not in sys.modules, 'a top-level module named kernels was created'; print(r.__file__)"
    )
    done = _python(code, ROOT)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).resolve() == ROOT / "kernels" / "reference.py"


def test_kernels_import_from_another_folder(tmp_path):
    done = _python("import sys, spread_optim.kernels.reference; assert 'kernels' not in sys.modules", tmp_path)
    assert done.returncode == 0, done.stderr


def test_demo_help_lists_problems_and_options():
    done = subprocess.run([sys.executable, "-m", "spread_optim.demo", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for word in ("--quick", "orthogonal", "correlated", "group", "mlp"):
        assert word in done.stdout
    assert "Lasso, orthogonal design" not in done.stdout  # --help runs nothing


def test_demo_rejects_an_unknown_problem():
    done = subprocess.run([sys.executable, "-m", "spread_optim.demo", "lasso"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "unknown problem 'lasso'" in done.stderr


def test_demo_runs_one_quick_problem():
    done = subprocess.run([sys.executable, "-m", "spread_optim.demo", "--quick", "group"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "same groups True" in done.stdout
