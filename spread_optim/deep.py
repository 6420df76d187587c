r"""Depth-k sparsity kinds: the non-convex penalties ``L_{2/k}`` (``L_{2/3}``, ``L_{1/2}``, ...) with exact zeros.

A param group with ``depth=k > 2`` stores ``theta = U_1 * ... * U_{k-1} * W`` (element sparsity; the ``U_j``
stacked in ``state["U"]`` of shape ``(k-1, *theta.shape)``) or ``theta_g = u_{1,g} * ... * u_{k-1,g} * W_g``
(groups; ``state["u"]`` of shape ``(k-1, num_groups)``), with the smooth penalty ``kappa * sum ||factor||^2``, whose
minima are those of ``loss + k*kappa*sum|theta|^(2/k)`` (groups: ``k*kappa*sum_g ||theta_g||^(2/k)``). The math is
the last section of :mod:`spread_optim.kernels.reference`.

:class:`DeepElement` and :class:`DeepGrouped` are :class:`~spread_optim.sparsity.Element` and
:class:`~spread_optim.sparsity.Grouped` with the same verbs, so the optimizer's step never asks for the depth.
They run the PyTorch path only (:func:`spread_optim.kernels.dispatch.choose` falls back to it, with a one-time
``RuntimeWarning`` where a fused path would have run) and take plain tensors (not FSDP2's DTensors, yet).

The revival test of a zero depends on the proximal step (``reference.revival_threshold``); the zero pass records
the step it used in ``state[param]["prox_step"]`` (the group's lr, or LBFGS's backtracked revival step) so that
:meth:`kkt` reports the condition the zero pass enforces.
"""

from __future__ import annotations

import torch

from spread_optim.distributed import is_dtensor
from spread_optim.kernels import reference as ref
from spread_optim.sparsity import Element, Grouped, _max


def _refuse_sharded(kind) -> None:
    if any(is_dtensor(p) for p in kind.params):
        raise ValueError(f"{kind.where}: 'depth' > 2 does not take sharded (FSDP2 DTensor) parameters yet; use depth=2 there")


class _Deep:
    """What the depth-k kinds share: the depth, the spec path, the proximal step for the KKT residual."""

    def _deep_init(self) -> None:
        self.depth = self.group["depth"]
        self.fast = False  # no CPU fast path: the spec
        _refuse_sharded(self)

    def _record_step(self, p, lr: float) -> None:
        self.state[p]["prox_step"] = float(lr)

    def _step(self, p) -> float:
        return float(self.state[p].get("prox_step", self.group.get("lr", 1.0)))

    def fused_step(self, base_cls, grad_scale=None, found_inf=None) -> None:  # pragma: no cover - dispatch never picks it
        raise RuntimeError(f"{self.where}: the fused kernels take depth 2 only")


class DeepElement(_Deep, Element):
    """Element sparsity at depth k: ``theta = (prod_j U_j) * W``, penalty ``k*kappa*||theta||_{2/k}^{2/k}``."""

    dead_rule = staticmethod(ref.deep_element_dead)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._deep_init()

    def ensure_factors(self) -> None:
        for p in self.params:
            st = self.state[p]
            if "W" not in st:
                U, W = ref.deep_init_element(p.detach(), self.depth, self.group["init"])
                st.update(U=U, W=W, base={"U": {}, "W": {}})

    def begin(self) -> list:
        self._dead = []
        for p in self.params:
            U, W = self._factors(p)
            new_U, new_W = ref.deep_element_adopt(U, W, p.detach(), self.depth, self.group["init"])
            U.copy_(new_U)
            W.copy_(new_W)
            self._dead.append(self.dead_rule(U, W))
        return []

    def set_factor_grads(self, reduced=(), skip_W: bool = False) -> None:
        for p in self.params:
            st = self.state[p]
            g = self.loss_grad(p)
            if g is None:
                st["U"].grad = st["W"].grad = None
                continue
            st["U"].grad, st["W"].grad = ref.deep_element_factor_grads(g, st["U"], st["W"], self.kappa)

    def zero_pass(self, lr: float, theta_old=None, reduced=()) -> None:
        thr = self.group["zero_threshold"]
        for p, dead in zip(self.params, self._dead):
            g = self.loss_grad(p)
            if g is None:
                continue
            U, W = self._factors(p)
            old = p.detach() if theta_old is None else theta_old(p)
            new_U, new_W = ref.deep_element_zero_pass(U, W, g, old, dead, self.kappa, lr, thr, self.depth)
            U.copy_(new_U)
            W.copy_(new_W)
            self._record_step(p, lr)
            p.detach().copy_(ref.element_product(U, W))

    def write_theta(self) -> None:
        for p in self.params:
            p.detach().copy_(ref.element_product(*self._factors(p)))

    def kkt(self) -> float:
        worst = 0.0
        for p in self.params:
            g = self.loss_grad(p)
            if g is not None and g.numel():
                value = ref.deep_element_kkt(p.detach(), g, self.kappa, self.depth, self._step(p))
                worst = _max(worst, float(value))
        return worst


class DeepGrouped(_Deep, Grouped):
    """Group sparsity at depth k: ``theta_g = (prod_j u_{j,g}) * W_g``, penalty ``k*kappa*sum_g ||theta_g||^{2/k}``."""

    dead_rule = staticmethod(ref.deep_group_dead)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._deep_init()

    def ensure_factors(self) -> None:
        for members in self.sets:
            have = ["W" in self.state[p] for p in members]
            if all(have):
                continue
            if any(have):
                raise ValueError(f"{self.where}: a shared set cannot gain members after its first step")
            u, Ws = ref.deep_init_group([p.detach() for p in members], [self.structures[p] for p in members],
                                        self.depth, self.group["init"])
            for i, (p, W) in enumerate(zip(members, Ws)):
                self.state[p].update(W=W, base={"W": {}})
                if i == 0:
                    self.state[p]["u"] = u
                    self.state[p]["base"]["u"] = {}

    def begin(self) -> list:
        self._dead, self._pending = [], []
        for members in self.sets:
            u, Ws, structures = self._locals(members)
            thetas = [p.detach() for p in members]
            changed = ref.group_changed(ref.deep_scale(u), Ws, thetas, structures)
            if bool(changed.any()):
                new_u, new_Ws = ref.deep_group_adopt(u, Ws, thetas, structures, self.depth, self.group["init"], changed)
                u.copy_(new_u)
                for W, new_W in zip(Ws, new_Ws):
                    W.copy_(new_W)
            self._dead.append(self.dead_rule(u, ref.group_dots(Ws, Ws, structures)))
        return []

    def set_factor_grads(self, reduced=(), skip_W: bool = False) -> None:
        for _, members, u, Ws, structures, grads in self._sets_with_grads():
            st0 = self.state[members[0]]
            du, dWs = ref.deep_group_factor_grads(self._filled(grads, Ws), u, Ws, structures, self.kappa)
            st0["u"].grad = du
            for p, dW, g in zip(members, dWs, grads):
                self.state[p]["W"].grad = None if g is None else dW

    def zero_pass(self, lr: float, theta_old=None, reduced=()) -> None:
        thr = self.group["zero_threshold"]
        old = (lambda p: p.detach()) if theta_old is None else theta_old
        for k, members, u, Ws, structures, grads, olds in list(self._finish_inputs(old)):
            sums = ref.group_finish_sums(Ws, grads, olds, structures)
            new_u, new_Ws = ref.deep_group_zero_pass(u, Ws, grads, sums, structures, self._dead[k], self.kappa, lr, thr,
                                                     self.depth)
            u.copy_(new_u)
            for W, new_W in zip(Ws, new_Ws):
                W.copy_(new_W)
            for p in members:
                self._record_step(p, lr)
            self._write(members, u, Ws, structures)

    def _write(self, members, u, Ws, structures) -> None:
        P = ref.deep_scale(u)
        for p, W, s in zip(members, Ws, structures):
            p.detach().copy_(s.expand(P) * W)

    def kkt(self) -> float:
        worst = 0.0
        for members in self.sets:
            live = [(p, self.loss_grad(p)) for p in members]
            live = [(p, g) for p, g in live if g is not None and p.numel()]
            if not live:
                continue
            value = ref.deep_group_kkt([p.detach() for p, _ in live], [g for _, g in live],
                                       [self.structures[p] for p, _ in live], self.kappa, self.depth, self._step(members[0]))
            worst = _max(worst, float(value))
        return worst


def make_deep_kind(group: dict, index: int, state, path: str, comm, scratch=None, structures=None):
    """The kind of a sparse param group with ``depth > 2`` (:func:`spread_optim.sparsity.make_kind`)."""
    sparsity = group["sparsity"]
    if isinstance(sparsity, str) and sparsity == "element":
        return DeepElement(group, index, state, path, comm, scratch)
    return DeepGrouped(group, index, state, path, comm, scratch, structures)


def penalty_name(group: dict) -> str:
    """The penalty a param group carries: ``"L1"``, ``"L2/3"``, ``"L1/2"``, ``"group L1"``, ``"group L2/3"``, ...;
    ``"-"`` for a dense group (``kappa = 0``)."""
    if not group.get("kappa", 0.0):
        return "-"
    sparsity = group.get("sparsity", "element")
    grouped = not (isinstance(sparsity, str) and sparsity == "element")
    return ref.penalty_name(int(group.get("depth", 2)), grouped)
