"""Shared test settings."""

import os

import torch
from hypothesis import settings

# CI runs the same hypothesis examples every time (a failure there is reproducible, never a new draw);
# locally the property tests keep exploring (run with CI=true to get CI's examples).
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# The suite's tensors are tiny: one intra-op thread is faster, and it avoids the pathological slowdown of
# two spinning threads on a loaded 2-core machine (measured 75x on a small MLP backward).
torch.set_num_threads(1)

# Without a GPU the Triton kernels run in Triton's interpreter (read when a kernel module is imported,
# so set before any test imports one).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
