"""spread_optim: exact L1 and group-lasso sparsity for any PyTorch model by changing the optimizer.

``theta = U*W`` with the smooth penalty ``kappa*(||U||^2 + ||W||^2)`` has the minima of
``loss + 2*kappa*||theta||_1`` (*spread*, sparsity by redundancy); ``theta_g = u_g*W_g`` gives group lasso.
"""

from spread_optim.optimizer import SpreadOptimizer
from spread_optim.optimizers import SpreadAdam, SpreadAdamW, SpreadSGD
from spread_optim.report import SparsityReport, sparsity_report

__all__ = ["SpreadOptimizer", "SpreadSGD", "SpreadAdam", "SpreadAdamW", "sparsity_report", "SparsityReport", "SpreadFeatureSelector"]
__version__ = "0.1.0"


def __getattr__(name):
    # SpreadFeatureSelector is imported on first use: it imports scikit-learn (when installed), which would
    # add about 2 s to every `import spread_optim`
    if name == "SpreadFeatureSelector":
        from spread_optim.feature_selection import SpreadFeatureSelector

        return SpreadFeatureSelector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
