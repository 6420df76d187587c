"""Shared test settings."""

import torch

# The suite's tensors are tiny: one intra-op thread is faster, and it avoids the pathological slowdown of
# two spinning threads on a loaded 2-core machine (measured 75x on a small MLP backward).
torch.set_num_threads(1)
