"""spread_optim: exact L1 and group-lasso sparsity for any PyTorch model by changing the optimizer.

``theta = U*W`` with the smooth penalty ``kappa*(||U||^2 + ||W||^2)`` has the minima of
``loss + 2*kappa*||theta||_1`` (*spread*, sparsity by redundancy); ``theta_g = u_g*W_g`` gives group lasso.
"""


def _attach_checkout_kernels() -> None:
    """Make ``spread_optim.kernels`` importable when this package is a source checkout.

    The kernels live in the repository's top-level ``kernels/`` folder; an install (editable or not) puts
    them at ``spread_optim/kernels``. Python started in the checkout's root finds the checkout's
    ``spread_optim/`` before the installed copy, and the checkout has no ``spread_optim/kernels``: so here
    ``spread_optim.kernels`` is loaded from ``../kernels``. A top-level module ``kernels`` is never created.
    """
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    folder = os.path.join(os.path.dirname(here), "kernels")
    init = os.path.join(folder, "__init__.py")
    name = f"{__name__}.kernels"
    ours = os.path.isfile(init) and os.path.isfile(os.path.join(folder, "reference.py"))
    if name in sys.modules or os.path.isdir(os.path.join(here, "kernels")) or not ours:
        return
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module


_attach_checkout_kernels()

from spread_optim.optimizer import SpreadOptimizer  # noqa: E402
from spread_optim.dropins import SpreadAdam, SpreadAdamW, SpreadSGD  # noqa: E402
from spread_optim.report import SparsityReport, sparsity_report  # noqa: E402
from spread_optim.groups import param_groups  # noqa: E402
from spread_optim.frameworks import kkt_residual, penalty, register_timm, unwrap  # noqa: E402
from spread_optim.averaging import apply_support, sparse_avg_fn  # noqa: E402
from spread_optim.compact import compact  # noqa: E402  (imports torch-pruning when called)

__all__ = ["SpreadOptimizer", "SpreadSGD", "SpreadAdam", "SpreadAdamW", "sparsity_report", "SparsityReport", "SpreadFeatureSelector",
           "param_groups", "kkt_residual", "penalty", "unwrap", "register_timm", "apply_support", "sparse_avg_fn", "compact"]
__version__ = "0.1.0"


def __getattr__(name):
    # SpreadFeatureSelector is imported on first use: it imports scikit-learn (when installed), which would
    # add about 2 s to every `import spread_optim`
    if name == "SpreadFeatureSelector":
        from spread_optim.feature_selection import SpreadFeatureSelector

        return SpreadFeatureSelector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
