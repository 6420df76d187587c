"""Smoke test of ``benchmarks/node_sparsity.py --quick``: it runs on its own (a subprocess, as a user would run it),
writes its JSON and figure, and the numbers in the JSON are sane: fractions in [0, 1], nested counts ordered
(exact zeros are below any threshold, "in and out" is stricter than "out"), accuracies far above chance, no dead
neuron without a penalty, spread's group lasso kills neurons exactly, and its own neuron count agrees with
``sparsity_report``'s zero rows/columns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "node_sparsity.py"
FRACTIONS = ("dead_fraction", "dead_in_out_fraction", "weight_sparsity", "exact_dead_fraction",
             "exact_dead_in_out_fraction", "exact_removable_fraction", "exact_zero_weight_fraction",
             "train_accuracy", "test_accuracy")


def test_node_sparsity_quick(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--results", str(tmp_path)],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Weight decay (Adam, coupled L2)" in proc.stdout and "| relu |" in proc.stdout
    for name in ("node_sparsity.json", "node_sparsity.png"):
        assert (tmp_path / name).stat().st_size > 0, name

    result = json.loads((tmp_path / "node_sparsity.json").read_text())
    args = result["meta"]["args"]
    hidden = args["hidden"]
    assert result["meta"]["torch"] and result["meta"]["machine"]
    rows = result["rows"]
    wd_rows = [r for r in rows if r["method"] == "weight_decay"]
    sp_rows = [r for r in rows if r["method"] == "spread"]
    # every configuration ran: weight decay 0 plus the sweep, and every kappa, for every activation
    assert sorted((r["activation"], r["weight_decay"]) for r in wd_rows) == sorted(
        (a, wd) for a in args["activations"] for wd in [0.0, *args["weight_decays"]])
    assert sorted((r["activation"], r["kappa"]) for r in sp_rows) == sorted(
        (a, k) for a in args["activations"] for k in args["kappas"])
    for r in rows:
        for key in FRACTIONS:
            assert 0.0 <= r[key] <= 1.0, (key, r)
        assert r["test_accuracy"] > 0.5 and r["train_accuracy"] > 0.5, r  # chance is 0.1
        assert r["dead_neurons"] == round(r["dead_fraction"] * hidden), r
        # exact zeros are below any positive threshold; "in, bias and out" is stricter than "out"
        assert r["exact_dead_fraction"] <= r["dead_fraction"], r
        assert r["dead_in_out_fraction"] <= r["dead_fraction"], r
        assert r["exact_dead_in_out_fraction"] <= min(r["exact_dead_fraction"], r["exact_removable_fraction"]), r
        assert r["exact_zero_weight_fraction"] <= r["weight_sparsity"], r
        assert r["train_seconds"] > 0, r
    for r in wd_rows:
        if r["weight_decay"] == 0:
            # without a penalty nothing pulls ten outgoing weights under 1e-4, and Adam makes no exact zeros
            assert r["dead_fraction"] == 0 and r["exact_zero_weight_fraction"] == 0, r
    for r in sp_rows:
        # sparsity_report's zero groups: fc2 columns entirely 0 are the neurons with exactly zero outgoing weights
        assert r["report_dead_fc2_columns"] == round(r["exact_dead_fraction"] * hidden), r
        assert r["report_dead_fc1_rows"] >= round(r["exact_dead_in_out_fraction"] * hidden), r
        assert r["report_zero_groups"]["2.weight"][1] == hidden and r["report_zero_groups"]["0.weight"][1] == hidden, r
    # spread's group lasso removes neurons exactly, more with a larger kappa
    strongest = {a: max((r for r in sp_rows if r["activation"] == a), key=lambda r: r["kappa"]) for a in args["activations"]}
    weakest = {a: min((r for r in sp_rows if r["activation"] == a), key=lambda r: r["kappa"]) for a in args["activations"]}
    for a in args["activations"]:
        assert strongest[a]["exact_removable_fraction"] > 0.3, strongest[a]
        assert strongest[a]["exact_removable_fraction"] >= weakest[a]["exact_removable_fraction"], (strongest[a], weakest[a])
