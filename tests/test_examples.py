"""Each script in ``examples/`` runs on its own with ``--quick`` (a subprocess, as a user would run it). The scripts
check their own claims and exit non-zero when one fails: the HF run resumed from its checkpoint ends on the
uninterrupted run's weights, Lightning's automatic and manual optimization (closure returning the loss or None) end
on the same weights, ``compact()`` keeps the outputs, the EMA keeps the exact zeros."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    done = subprocess.run([sys.executable, str(EXAMPLES / script), "--quick", *args], capture_output=True, text=True,
                          timeout=240, env=env, cwd=EXAMPLES.parent)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    return done.stdout


def test_plain_pytorch():
    pytest.importorskip("sklearn")
    pytest.importorskip("torch_pruning")
    out = run("plain_pytorch.py")
    live, ema = map(int, re.search(r"exact zeros: live model (\d+), EMA (\d+)", out).groups())
    assert live > 0 and ema >= live
    before, after = map(int, re.search(r"parameters (\d+) -> (\d+)", out).groups())
    assert after < before
    assert float(re.search(r"max \|output difference\| (\S+),", out).group(1)) <= 1e-5


def test_hf_trainer_resumes_exactly():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    out = run("hf_trainer.py")
    assert "resumed run equals the uninterrupted run: True" in out
    assert "KKT residual" in out and "LayerNorm" not in out.split("KKT residual")[0]  # only regularised rows listed


def test_lightning_automatic_and_manual_optimization():
    pytest.importorskip("lightning")
    pytest.importorskip("sklearn")
    out = run("lightning_example.py")
    for mode in ("automatic", "manual", "manual-none"):
        assert f"{mode}: same weights as automatic: True" in out
        assert f"{mode}: KKT residual" in out


def test_timm_compact():
    pytest.importorskip("timm")
    pytest.importorskip("torch_pruning")
    pytest.importorskip("sklearn")
    out = run("timm_compact.py")
    rows = dict(re.findall(r"\| (before|after) compact \| ([\d,]+) \|", out))
    assert int(rows["after"].replace(",", "")) < int(rows["before"].replace(",", ""))
    assert float(re.search(r"test images (\S+)", out).group(1)) <= 1e-5
