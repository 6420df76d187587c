"""``benchmarks/nonconvex.py --quick`` runs, and its claims hold at that size.

* every method sweeps the strengths and ends with exact zeros;
* the lasso (convex): spread depth 2 and skglm's L1 reach the same objective at every strength;
* the non-convex penalties fix the lasso's bias: spread depth 3 or 4 reaches a smaller estimation error than
  spread depth 2 at its best strength;
* for L2/3 and L1/2 both sides' objectives are reported (they are local solvers: neither is asserted to win).

The run against skglm is marked slow (numba compiles skglm's solvers first: about 20 s of the run's 35 s); the
default suite runs the spread side alone (``--no-skglm``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("matplotlib")


@pytest.mark.parametrize("skglm", [pytest.param(True, marks=pytest.mark.slow), False], ids=["with_skglm", "spread_only"])
def test_nonconvex_quick(tmp_path, skglm):
    if skglm:
        pytest.importorskip("skglm")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    command = [sys.executable, str(ROOT / "benchmarks" / "nonconvex.py"), "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(command + ([] if skglm else ["--no-skglm"]), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, f"nonconvex.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "| problem |" in proc.stdout
    assert (tmp_path / "nonconvex.png").stat().st_size > 1000
    data = json.loads((tmp_path / "nonconvex.json").read_text())
    (problem,) = data["problems"]
    methods = problem["methods"]
    spread = {"spread depth 2 (L1)", "spread depth 3 (L2/3)", "spread depth 4 (L1/2)"}
    assert set(methods) == spread | ({"skglm L1", "skglm L2_3", "skglm L0_5", "skglm MCP"} if skglm else set())
    levels = len(data["meta"]["levels"])
    for name, rows in methods.items():
        assert len(rows) == levels, name
        assert all(r["nnz"] < problem["d"] for r in rows), name
        assert rows[0]["nnz"] < rows[-1]["nnz"], name  # from few to many nonzeros
    lasso_error = min(r["error"] for r in methods["spread depth 2 (L1)"])
    deep_error = min(r["error"] for name in ("spread depth 3 (L2/3)", "spread depth 4 (L1/2)") for r in methods[name])
    assert deep_error < lasso_error
    if not skglm:
        return
    for ours, theirs in zip(methods["spread depth 2 (L1)"], methods["skglm L1"]):
        assert ours["objective"] == pytest.approx(theirs["objective"], rel=1e-6)
        assert theirs["spread_objective"] == ours["objective"]
    for name in ("skglm L2_3", "skglm L0_5"):
        assert all(r["objective"] > 0 and r["spread_objective"] > 0 for r in methods[name])
