"""Smoke test of ``benchmarks/feature_selection.py --quick``: it runs on its own (a subprocess, as a user would run it)
on one gene set, writes its JSON and figure, and the numbers in the JSON are sane (accuracies in [0, 1], spread's
models use a small part of the genes and beat the majority class, the weight-decay MLP uses all genes, timings
positive). LassoNet (minutes per path) and HSIC Lasso (optional packages) are left out of the smoke run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("threadpoolctl")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "feature_selection.py"
DATA = ROOT.parent / "shared" / "data" / "genes"


@pytest.mark.skipif(not (DATA / "lymphoma.npz").exists(), reason="gene sets not available (../shared/data/genes)")
def test_feature_selection_quick(tmp_path):
    methods = ["spread linear", "spread linear+MLP", "MLP (WD)", "MLP (naive L1)", "L1 logistic"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--results", str(tmp_path), "--methods", *methods],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for m in methods:
        assert f"| {m} |" in proc.stdout, m
    assert (tmp_path / "feature_selection.png").stat().st_size > 0
    result = json.loads((tmp_path / "feature_selection.json").read_text())
    assert result["meta"]["quick"] and result["meta"]["args"]["sets"] == ["lymphoma"]
    d = result["dims"]["lymphoma"]
    assert d == 4026
    summary = result["summary"]["lymphoma"]
    assert set(summary) == {*methods, "majority"}
    majority = summary["majority"]["acc_mean"]
    assert 0.3 < majority < 0.8  # lymphoma's largest class is 46/96
    for m in methods:
        s = summary[m]
        assert 0 <= s["acc_mean"] <= 1 and s["reps"] == 1, (m, s)
        assert 1 <= s["genes_mean"] <= d, (m, s)
        assert s["fit_seconds"] > 0 and s["grid_seconds"] >= s["fit_seconds"], (m, s)
        run = result["runs"]["lymphoma"][m][0]
        assert 0 <= run["dev_acc"] <= 1 and run["config"], run
    # spread makes exact zeros: its models use a strict subset of the genes; the plain MLPs use all of them
    for m in ("spread linear", "spread linear+MLP"):
        assert summary[m]["genes_mean"] < 0.5 * d, summary[m]
        assert summary[m]["acc_mean"] > majority, summary[m]  # better than the floor even in the smoke run
    assert summary["MLP (WD)"]["genes_mean"] == d
    assert summary["L1 logistic"]["genes_mean"] < d
