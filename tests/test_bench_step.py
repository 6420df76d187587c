"""Smoke tests of the step-time benchmarks (``benchmarks/step_speed.py --quick``, ``small_tensors.py``,
``compile_step.py --quick``): each runs on its own, as a user would run it, and its numbers are consistent (every
method timed on every workload, ratios to torch's fused Adam, bandwidth = bytes / time, compiled weights equal to
eager ones). No timing is asserted."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tqdm")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_step_speed_quick(tmp_path):
    run("step_speed.py", "--quick", "--threads", "1", "--results", str(tmp_path))
    rows = json.loads((tmp_path / "step_speed.json").read_text())["rows"]
    methods = {"torch Adam fused", "torch Adam foreach"} | {f"spread {path} ({kind})" for path in ("default", "split", "inductor")
                                                            for kind in ("element", "row", "column")}
    for workload in {r["workload"] for r in rows}:
        mine = {r["method"]: r for r in rows if r["workload"] == workload}
        assert set(mine) == methods
        assert mine["torch Adam fused"]["ratio_to_torch"] == pytest.approx(1.0)
        for r in mine.values():
            assert r["ms"] > 0 and r["first_step_s"] >= 0
            assert r["GB/s"] == pytest.approx(r["bytes_per_step"] / (r["ms"] * 1e-3) / 1e9)
            assert r["ratio_to_torch"] == pytest.approx(r["ms"] / mine["torch Adam fused"]["ms"])


def test_small_tensors_runs():
    out = run("small_tensors.py", "--rounds", "8")
    lines = [line for line in out.splitlines() if line.startswith("| ") and "ms" not in line.split("|")[1]]
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["MLP 40-64-4", "MLP 40-64-4, column", "62 x 64", "ResNet-18 / 16"]


@pytest.mark.slow
def test_compile_step_quick(tmp_path):
    run("compile_step.py", "--quick", "--results", str(tmp_path))
    (row,) = json.loads((tmp_path / "compile_step.json").read_text())
    assert row["kind"] == "element" and row["same"] is True and row["graph_breaks"] >= 0


def test_native_step_quick():
    out = run("native_step.py", "--quick")
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert [int(r[0]) for r in rows] == [4096]
    torch_ = float(rows[0][4])
    for cell in rows[0][1:4]:  # the three loops: "ns (x torch)"
        ns, ratio = cell.replace("(", " ").replace(")", " ").split()
        assert float(ns) > 0 and torch_ > 0 and float(ratio) == pytest.approx(float(ns) / torch_, abs=0.01)
    assert float(rows[0][5]) > 0 and float(rows[0][6]) > 0
    resnet = re.search(r"ResNet-18's 3 column tensors \((\d+) elements\), one call: columns loop ([\d.]+) ms, "
                       r"torch Adam fused ([\d.]+) ms, ([\d.]+)x; with the non-finite check before it ([\d.]+) ms "
                       r"\(([\d.]+)x\), the checked call \(the check in its sums pass\) ([\d.]+) ms \(([\d.]+)x\)", out)
    assert resnet is not None and int(resnet[1]) == 64 * 3 * 49 + 2 * 64 * 64 * 9
    for ms, ratio in ((2, 4), (5, 6), (7, 8)):  # (times rounded)
        assert float(resnet[ratio]) == pytest.approx(float(resnet[ms]) / float(resnet[3]), abs=0.01, rel=0.01)
    snapping = re.search(r"A \(64, 1024\) tensor, columns loop: ([\d.]+) ms when no column snaps, ([\d.]+) ms when "
                         r"(\d+) of the 1024 do", out)
    assert snapping is not None and float(snapping[1]) > 0 and float(snapping[2]) > 0 and 200 < int(snapping[3]) < 800
