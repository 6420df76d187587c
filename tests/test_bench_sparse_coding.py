"""Smoke test of ``benchmarks/sparse_coding.py --quick``: it runs on its own (a subprocess, as a user would run it),
writes its JSON and figures, and the figures in the JSON are sane (exact zeros in the codes, errors below 1, the
held-out codes of spread's coder close to scikit-learn's lasso_cd optimum on the same dictionary)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("threadpoolctl")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sparse_coding.py"


def test_sparse_coding_quick(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--results", str(tmp_path)],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| spread |" in proc.stdout and "| MiniBatchDictionaryLearning (cd) |" in proc.stdout
    figures = ("sparse_coding_atoms.png", "sparse_coding_atoms_sklearn.png", "sparse_coding_curve.png")
    for name in ("sparse_coding.json", *figures):
        assert (tmp_path / name).stat().st_size > 0, name

    result = json.loads((tmp_path / "sparse_coding.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"spread", "MiniBatchDictionaryLearning"}
    patch_pixels, atoms = 16 * 16, result["meta"]["args"]["atoms"]
    assert atoms >= 256
    for r in result["rows"]:
        assert 0 < r["rel_error"] < 1, r  # better than coding every patch as zero
        assert 0 < r["zero_fraction"] < 1, r  # exact zeros, but not all of them
        assert 0 < r["nnz_per_patch"] < patch_pixels, r
        assert math.isclose(r["zero_fraction"], 1 - r["nnz_per_patch"] / atoms, rel_tol=1e-6), r
        assert r["train_seconds"] > 0 and r["test_coding_seconds"] > 0, r
    spread = rows["spread"]
    # spread's coder solves the same lasso as lasso_cd: on the same dictionary the objectives agree closely
    assert abs(spread["coder_objective_gap_vs_lasso_cd"]) < 1e-3, spread
    assert spread["nnz_per_patch"] < 0.2 * atoms  # sparse codes, not merely a few zeros
    assert result["curves"]["spread"] and result["curves"]["spread"][-1]["rel_error"] == spread["rel_error"]
