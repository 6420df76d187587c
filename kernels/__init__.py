"""Update kernels of spread_optim, installed as ``spread_optim.kernels`` (never import ``kernels`` bare).

``reference`` is the pure-PyTorch definition of every spread update rule; it is also the CPU path.
"""
