"""Update kernels of spread_optim, installed as ``spread_optim.kernels`` (never import ``kernels`` bare).

* ``reference``: the spec, the pure-PyTorch definition of every spread update rule;
* ``cpu``: the spec's CPU fast path (the same numbers in fewer passes);
* ``element``, ``group``: the fused Triton kernels (with ``rules`` and ``tables``);
* ``dispatch``: the one function that chooses which of them steps a param group.
"""
