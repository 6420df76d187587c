"""Smoke test of ``benchmarks/feature_selection.py --quick``: it runs on its own (a subprocess, as a user would run it)
on one gene set (lymphoma from ``../shared/data/genes``; where that folder is not beside the checkout, a synthetic
set of the same shape, so that the script is still exercised), writes its JSON and figure, and the numbers in the JSON are sane (accuracies in [0, 1], spread's
models use a small part of the genes and beat the majority class, the weight-decay MLP uses all genes, timings
positive). LassoNet (minutes per path) and HSIC Lasso (optional packages) are left out of the smoke run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("threadpoolctl")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "feature_selection.py"
DATA = ROOT.parent / "shared" / "data" / "genes"


def synthetic_set(folder: Path) -> int:
    """96 samples x 4026 genes, 9 classes of lymphoma's sizes, 12 informative genes; returns the majority count."""
    rng = np.random.default_rng(0)
    counts = [46, 10, 9, 11, 6, 6, 4, 2, 2]
    y = np.repeat(np.arange(9), counts)
    X = rng.standard_normal((96, 4026)).astype(np.float32)
    X[:, :12] += 2.0 * rng.standard_normal((9, 12)).astype(np.float32)[y]
    folder.mkdir()
    np.savez(folder / "synthetic.npz", X=X, y=y.astype(np.int64))
    return max(counts)


def test_feature_selection_quick(tmp_path):
    name, extra = "lymphoma", []
    if not (DATA / "lymphoma.npz").exists():
        synthetic_set(tmp_path / "data")
        name, extra = "synthetic", ["--data", str(tmp_path / "data"), "--sets", "synthetic"]
    methods = ["spread linear", "spread linear+MLP", "spread linear+MLP, then MLP (WD) on its genes", "MLP (WD)",
               "MLP (naive L1)", "L1 logistic"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--results", str(tmp_path), "--methods", *methods, *extra],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for m in methods:
        assert f"| {m} |" in proc.stdout, m
    assert (tmp_path / "feature_selection.png").stat().st_size > 0
    result = json.loads((tmp_path / "feature_selection.json").read_text())
    assert result["meta"]["quick"] and result["meta"]["args"]["sets"] == [name]
    d = result["dims"][name]
    assert d == 4026
    summary = result["summary"][name]
    assert set(summary) == {*methods, "majority"}
    majority = summary["majority"]["acc_mean"]
    assert 0.3 < majority < 0.8  # lymphoma's largest class is 46/96
    for m in methods:
        s = summary[m]
        assert 0 <= s["acc_mean"] <= 1 and s["reps"] == 1, (m, s)
        assert 1 <= s["genes_mean"] <= d, (m, s)
        assert s["fit_seconds"] > 0 and s["grid_seconds"] >= s["fit_seconds"], (m, s)
        run = result["runs"][name][m][0]
        assert 0 <= run["dev_acc"] <= 1 and run["config"], run
    # spread makes exact zeros: its models use a strict subset of the genes; the plain MLPs use all of them
    for m in ("spread linear", "spread linear+MLP"):
        assert summary[m]["genes_mean"] < 0.5 * d, summary[m]
        assert summary[m]["acc_mean"] > majority, summary[m]  # better than the floor even in the smoke run
    assert summary["MLP (WD)"]["genes_mean"] == d
    # the two-stage row refits on exactly the genes of the chosen spread ensemble
    for refit, ens in zip(result["runs"][name][methods[2]], result["runs"][name]["spread linear+MLP"]):
        assert refit["genes"] == ens["genes"] and refit["config"]["spread"] == ens["config"], (refit, ens)
    assert summary["L1 logistic"]["genes_mean"] < d
