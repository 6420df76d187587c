"""Smoke test of ``benchmarks/pruning.py --quick``: it runs on its own (a subprocess, as a user would run it), writes
its JSON and figure, and the numbers in the JSON are sane: every compression ratio agrees with the counted zeros and
the masks, accuracies are above chance where the net keeps enough weights, and the small dense network built from the
surviving filters/neurons has fewer parameters (as many as its widths imply) and gives the same outputs as the big
net with its zeros."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("torch_pruning")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "pruning.py"


def cnn_params(w: dict) -> int:
    """Parameters of DigitsCNN with these widths (conv 3x3 from 1 channel, 2x2 spatial after two poolings)."""
    c1, c2, h1, h2 = w["conv1"], w["conv2"], w["fc1"], w["fc2"]
    return (9 * c1 + c1) + (9 * c1 * c2 + c2) + (4 * c2 * h1 + h1) + (h1 * h2 + h2) + (10 * h2 + 10)


def test_pruning_quick(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--results", str(tmp_path)],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| compact() |" in proc.stdout and "spread >= magnitude" in proc.stdout
    for name in ("pruning.json", "pruning.png"):
        assert (tmp_path / name).stat().st_size > 0, name

    result = json.loads((tmp_path / "pruning.json").read_text())
    args = result["meta"]["args"]
    total = result["architecture"]["prunable_weights"]
    assert total == cnn_params(result["architecture"]["widths"]) - sum(result["architecture"]["widths"].values()) - 10

    trained = result["trained"]
    assert len(trained) == len(args["weight_decays"]) + 2 * len(args["kappas"])
    for r in trained:
        assert 0.5 < r["test_accuracy"] <= 1 and 0.5 < r["train_accuracy"] <= 1, r  # chance is 0.1
        assert r["prunable_weights"] == total and 0 < r["nonzero_weights"] <= total, r
        assert r["compression"] == pytest.approx(total / r["nonzero_weights"]), r
    assert all(r["nonzero_weights"] == total for r in trained if r["method"] != "spread")  # no exact zeros
    assert any(r["nonzero_weights"] < total for r in trained if r["method"] == "spread")  # spread makes exact zeros

    candidates, points = result["candidates"], result["points"]
    assert len(candidates) == len(trained) * len(args["ratios"])
    for c in candidates:
        keep = max(1, round(total / c["target_ratio"]))
        assert c["kept_by_mask"] == keep and c["masked"] == total - keep, c
        # finetuning under the masks cannot revive a pruned weight: at most `keep` nonzeros remain
        assert c["nonzero_weights"] <= keep, c
        assert c["zero_weights"] == total - c["nonzero_weights"], c
        assert c["compression"] == pytest.approx(total / (total - c["zero_weights"])), c
        assert c["compression"] >= c["target_ratio"] * (1 - 1 / keep), c
        for key in ("test_accuracy", "test_accuracy_pruned", "train_accuracy"):
            assert 0 <= c[key] <= 1, (key, c)
    assert sorted((p["method"], p["target_ratio"]) for p in points) == sorted(
        (m, r) for m in ("spread", "magnitude", "naive_l1") for r in args["ratios"])
    for p in points:
        assert p["selected"]
        same = [c for c in candidates if c["method"] == p["method"] and c["target_ratio"] == p["target_ratio"]]
        assert p["train_loss"] == min(c["train_loss"] for c in same), p  # selection by training loss
        if p["target_ratio"] <= 10:
            assert p["test_accuracy"] > 0.3, p  # a tenth of the weights, finetuned: well above chance

    s = result["structured"]
    assert s["outputs_equal"] and s["predictions_equal"], s
    assert s["max_abs_output_difference"] < 1e-4, s
    assert s["test_accuracy_small"] == s["test_accuracy_big"] > 0.3, s
    assert s["params_original"] == cnn_params(s["widths_original"]), s
    assert s["params_small"] == cnn_params(s["widths_small"]), s
    assert s["params_small"] < s["params_original"], s  # some filters or neurons were removed
    assert 0 < s["macs_small"] < s["macs_original"], s
    for name, info in s["layers"].items():
        assert info["kept"] == s["widths_small"][name], (name, s)
        lost = s["widths_original"][name] - info["kept"]
        assert max(info["dead_in"], info["dead_out"]) <= lost <= info["dead_in"] + info["dead_out"], (name, info)
    report = {r["name"]: r for r in s["report"]}
    for name in ("conv1", "conv2", "fc1", "fc2"):  # sparsity_report's zero rows are the filters with zero weights
        assert report[f"{name}.weight"]["zero_groups"] >= s["layers"][name]["dead_in"], (name, report)
    assert s["inference_ms_original"] > 0 and s["inference_ms_small"] > 0, s
