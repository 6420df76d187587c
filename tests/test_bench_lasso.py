"""The lasso benchmark scripts run (``--quick``) and their key claims hold at that size.

Each script runs in a subprocess, as CI would run it, writing into a temporary folder; the test then reads
the JSON it wrote. The claims are the ones the scripts exist to show:

* ``benchmarks/lasso_path.py``: spread (SGD, Adam, LBFGS bases) is within 1e-6 of the closed form with the
  exact support at every value of lambda; naive (sub)gradient L1 has no exact zeros at all;
* ``benchmarks/lasso_speed.py``: ``SpreadLasso`` reaches relative suboptimality 1e-6 with the reference's support
  on every problem (gene sets and Toeplitz designs, one and four outputs, two values of lambda), the reference is
  certified by its duality gap, and every solver reported as "reached" is really within 1e-6 with that support.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
for module in ("matplotlib", "tqdm", "sklearn"):
    pytest.importorskip(module)


def run_script(name: str, out: Path, *extra: str, timeout: float = 150) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), "--quick", "--out", str(out), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "|" in proc.stdout  # printed its markdown table


def test_lasso_path_quick(tmp_path):
    run_script("lasso_path.py", tmp_path)
    assert (tmp_path / "lasso_sparsity.png").stat().st_size > 1000
    data = json.loads((tmp_path / "lasso_path.json").read_text())
    rows = data["rows"]
    assert len(rows) >= 6
    zero_fractions = [r["closed_form_zero_fraction"] for r in rows]
    assert zero_fractions[0] == 0.0 and zero_fractions[-1] == 1.0  # from no zeros to all zeros
    assert zero_fractions == sorted(zero_fractions)
    for name in ("spread SGD", "spread Adam", "spread LBFGS"):
        for r in rows:
            m = r["methods"][name]
            assert m["max_error"] <= 1e-6, (name, r["lam"], m)
            assert m["exact_support"], (name, r["lam"], m)
            assert m["zero_fraction"] == r["closed_form_zero_fraction"]
    for name in ("naive SGD", "naive Adam"):
        should_be_zero = [r for r in rows if r["closed_form_zero_fraction"] > 0]
        assert all(r["methods"][name]["zero_fraction"] == 0.0 for r in should_be_zero), name
        assert not data["summary"][name]["exact_support_everywhere"]
        # visibly not sparse: entries the closed form zeroes are far from zero
        assert max(r["methods"][name]["max_abs_where_closed_form_is_zero"] for r in should_be_zero) > 1e-4


def test_lasso_speed_quick(tmp_path):
    pytest.importorskip("skglm")
    pytest.importorskip("celer")
    pytest.importorskip("threadpoolctl")
    run_script("lasso_speed.py", tmp_path)
    assert (tmp_path / "lasso_speed.png").stat().st_size > 1000
    data = json.loads((tmp_path / "lasso_speed.json").read_text())
    problems = data["problems"]
    toeplitz = [p for p in problems if p["problem"].startswith("Toeplitz")]
    assert {p["outputs"] for p in toeplitz} == {1, 4} and {p["frac"] for p in problems} == {0.1, 0.01}
    for p in problems:
        assert p["reference_max_relative_gap"] < 1e-9, p["problem"]  # a certified reference
        assert set(p["solvers"]) == {"celer", "skglm", "scikit-learn", "FISTA", "SpreadLasso"}
        r = p["solvers"]["SpreadLasso"]
        assert r["reached"], (p["problem"], r)
        assert r["nnz"] == p["reference_nnz"]
        for solver, r in p["solvers"].items():
            if r["reached"]:
                assert r["subopt"] <= 1e-6 and r["support_mismatches"] == 0, (p["problem"], solver, r)
    if (ROOT.parent / "shared" / "data" / "genes" / "ALLAML.npz").exists():
        assert any(p["problem"] == "gene set ALLAML" for p in problems)
