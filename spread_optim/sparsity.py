r"""The sparsity kinds of a sparse param group, as objects with the same verbs.

:class:`Element` (``theta = U*W``, L1) and :class:`Grouped` (``theta_g = u_g*W_g``, group lasso over rows,
columns, explicit ids, possibly shared by several parameters) each wrap one param group and the optimizer's
state. The step (:class:`spread_optim.SpreadOptimizer`) calls the same verbs on every kind, in this order, and never asks
which kind it holds:

=====================  =====================================================================================
``ensure_factors``     create the factors of parameters that have none (from the weights: ``init``)
``adopt``              rebuild the factors of entries whose weight was changed outside the optimizer
``nonfinite``          per parameter, a scalar that is nonzero when its gradient has a NaN or inf
``begin``              remember which entries are dead (on the zero saddle) at the step's start; returns the
                       partial sums that need other ranks (groups spanning shards), else ``[]``
``set_factor_grads``   the smooth objective's factor gradients, into the factors' ``.grad``
``finish_sums``        after the base step: partial sums the zero pass needs from other ranks, else ``[]``
``zero_pass``          hold / revive / snap (:mod:`spread_optim.kernels.reference`), then write theta
``write_theta``        ``theta = U*W`` (``u_g*W_g``) into the parameters
``kkt``, ``penalty``   diagnostics
=====================  =====================================================================================

Sums over groups that span shards (FSDP2) are the only thing a kind needs from other ranks; the kinds hand them
to the step, which sums all of them in one round through the communicator (identity in one process).
Arithmetic runs on local shards: ``local(t)`` is ``t`` itself for a plain tensor.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from spread_optim import _fused
from spread_optim.distributed import LOCAL, is_dtensor, is_sharded, like, local, local_rows, vector_like
from spread_optim.kernels import cpu, native
from spread_optim.kernels import reference as ref
from spread_optim.structure import GroupStructure

Theta = Callable[[torch.Tensor], torch.Tensor]  # parameter -> its local theta at the step's start


def _theta_now(p: torch.Tensor) -> torch.Tensor:
    return local(p.detach())


def write_product(p: torch.Tensor, U: torch.Tensor, W: torch.Tensor) -> None:
    """``p = U*W`` on local tensors (no temporary when the dtypes agree: a fresh full-size tensor costs page
    faults on CPU)."""
    if p.dtype == U.dtype and p.is_contiguous():
        torch.mul(U, W, out=p)
    else:
        p.copy_(U * W)


class Kind:
    """What :class:`Element` and :class:`Grouped` share: the param group, the optimizer's state, the path."""

    factor_keys: tuple[str, ...] = ()
    #: the fused kernels need one parameter dtype across the param group
    one_dtype = False
    #: parameters share factors (share_groups)
    shared = False

    def __init__(self, group: dict, index: int, state, path: str = "spec", comm=LOCAL, scratch: dict | None = None):
        self.group, self.state, self.comm = group, state, comm
        self.where = f"param group {index}"
        # a tensor listed twice (torch warns about it when the group is added) is stepped once
        self.params: list[torch.Tensor] = list({id(p): p for p in group["params"]}.values())
        self.fast = path == "cpu"  # the CPU fast path of the spec (kernels/cpu.py)
        self.path = path
        self.scratch = {} if scratch is None else scratch
        self._dead: list = []
        self.factor_grads_dropped = False  # (a fused step drops the factors' gradients once: see SpreadOptimizer)

    # the loss gradient as the factors see it
    def loss_grad(self, p: torch.Tensor) -> torch.Tensor | None:
        """``dL/dtheta`` (local, in the factors' dtype; ``-grad`` when maximising), None without a gradient."""
        if p.grad is None:
            return None
        g = local(p.grad)
        g = g.to(ref.factor_dtype(p.dtype))
        return -g if self.group.get("maximize", False) else g

    @property
    def kappa(self) -> float:
        return self.group["kappa"]

    def factor_leaves(self) -> Iterator[tuple[torch.Tensor, str, torch.Tensor]]:
        """``(param, key, factor)`` for every factor, in the order the base receives them."""
        for p in self.params:
            st = self.state[p]
            for key in ("U", "u", "W"):
                if key in st:
                    yield p, key, st[key]

    def checked_grads(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(param, local gradient)`` per parameter with a gradient, its shape and type checked (the optimizer
        probes all its groups' gradients in one call: :func:`probes`)."""
        out = []
        for p in self.params:
            g = p.grad
            if g is None:
                continue
            g = local(g)
            if g.shape != local(p).shape:
                raise ValueError(f"{self.where}: a gradient of shape {tuple(g.shape)} for a parameter of shape "
                                 f"{tuple(p.shape)}; nothing was updated")
            if g.is_sparse:
                raise TypeError(f"{self.where}: sparse gradients are not supported in a sparse group (parameter of shape {tuple(p.shape)})")
            if g.is_complex():
                raise TypeError(f"{self.where}: complex gradients are not supported in a sparse group")
            out.append((p, g))
        return out

    # the sums a kind needs from other ranks: none unless its groups span shards (Grouped overrides these)
    @property
    def spans_shards(self) -> bool:
        return False

    def end_begin(self, reduced=()) -> bool:
        """Complete :meth:`begin` with its parts summed over ranks; True when the step must start over."""
        return False

    def grad_sums(self) -> list:
        return []

    def set_W_grads_first(self) -> list:
        return []

    def finish_sums(self, theta_old: Theta = _theta_now) -> list:
        return []

    def penalty(self) -> torch.Tensor:
        """This rank's part of ``kappa*sum ||factor||^2`` (replicated factors counted on one rank)."""
        mine = self.comm.owns_replicated()
        factors = [local(f) for _, _, f in self.factor_leaves() if mine or is_sharded(f)]
        return ref.penalty(factors, self.kappa) if factors else torch.zeros((), dtype=torch.float64)


class Element(Kind):
    """Element sparsity: ``theta = U*W`` entry by entry, penalty ``2*kappa*||theta||_1``."""

    factor_keys = ("U", "W")
    #: which entries are dead (on the zero saddle): the spec's rule of this kind
    dead_rule = staticmethod(ref.element_dead)

    def ensure_factors(self) -> None:
        for p in self.params:
            st = self.state[p]
            if "W" not in st:
                U, W = ref.init_element(local(p), self.group["init"])
                st.update(U=like(U, p), W=like(W, p), base={"U": {}, "W": {}})

    def _factors(self, p):
        st = self.state[p]
        return local(st["U"]), local(st["W"])

    def begin(self) -> list:
        """Adopt the weights written outside the optimizer, then remember the dead entries."""
        if self.fast:
            self._units = self._pack_units()
            dead = {}
            for unit in self._units:
                dead.update(self._begin_unit(unit))
            self._dead = [dead[id(p)] for p in self.params]
            return []
        self._dead = []
        for p in self.params:
            U, W = self._factors(p)
            new_U, new_W = ref.element_adopt(U, W, local(p.detach()), self.group["init"])
            U.copy_(new_U)
            W.copy_(new_W)
            self._dead.append(ref.element_dead(U, W))
        return []

    def _pack_units(self) -> list[tuple[list[torch.Tensor], cpu.Pack | None]]:
        """The CPU fast path's units: small contiguous parameters of one dtype packed together (:class:`cpu.Pack`),
        every other parameter alone (``pack`` None)."""
        packs, units = {}, []
        for p in self.params:
            U, W = self._factors(p)
            theta = local(p.detach())
            if U.numel() <= cpu.PACK_MAX and all(t.is_contiguous() for t in (U, W, theta)):
                packs.setdefault((theta.dtype, U.dtype), []).append(p)
            else:
                units.append([p])
        units += packs.values()
        return [(unit, cpu.Pack([self._factors(p)[0] for p in unit]) if len(unit) > 1 else None) for unit in units]

    def _begin_unit(self, unit) -> dict[int, torch.Tensor]:
        params, pack = unit
        Us, Ws = zip(*(self._factors(p) for p in params))
        thetas = [local(p.detach()) for p in params]
        if pack is None:
            cpu.element_adopt_(Us[0], Ws[0], thetas[0], self.group["init"])
            return {id(params[0]): cpu.element_dead(Us[0], Ws[0], out=self._scratch(params[0], Us[0]))}
        U, W = pack.flat(Us), pack.flat(Ws)
        if cpu.element_adopt_(U, W, pack.flat(thetas), self.group["init"]):
            pack.scatter_(U, Us)
            pack.scatter_(W, Ws)
        return dict(zip(map(id, params), pack.views(cpu.element_dead(U, W), Us)))

    def _scratch(self, p, U):
        """A buffer like ``U`` kept between steps for the dead mask (None for small tensors)."""
        if U.numel() < cpu.CHUNK or not U.is_contiguous():
            return None
        buffer = self.scratch.get(p)
        if buffer is None or buffer.shape != U.shape or buffer.dtype != U.dtype or buffer.device != U.device:
            buffer = self.scratch[p] = torch.empty_like(U)
        return buffer

    def set_factor_grads(self, reduced=(), skip_W: bool = False) -> None:
        live = []
        for p in self.params:
            st = self.state[p]
            g = self.loss_grad(p)
            if g is None:
                st["U"].grad = st["W"].grad = None
            else:
                live.append((p, st, g))
        if not live:
            return
        if self.fast:
            Us = [local(st["U"]) for _, st, _ in live]
            Ws = [local(st["W"]) for _, st, _ in live]
            out = ([_reusable(st["U"].grad, U) for (_, st, _), U in zip(live, Us)],
                   [_reusable(st["W"].grad, W) for (_, st, _), W in zip(live, Ws)])
            dUs, dWs = cpu.element_factor_grads([g for _, _, g in live], Us, Ws, self.kappa, out=out)
        else:
            pairs = [ref.element_factor_grads(g, *self._factors(p), self.kappa) for p, _, g in live]
            dUs, dWs = [a for a, _ in pairs], [b for _, b in pairs]
        for (p, st, _), dU, dW in zip(live, dUs, dWs):
            st["U"].grad = dU if dU is st["U"].grad else like(dU, st["U"])
            st["W"].grad = dW if dW is st["W"].grad else like(dW, st["W"])

    def zero_pass(self, lr: float, theta_old: Theta = _theta_now, reduced=()) -> None:
        thr = self.group["zero_threshold"]
        dead_of = {id(p): dead for p, dead in zip(self.params, self._dead)}
        singles = self.params
        if self.fast:
            singles = []
            for params, pack in self._units:
                if pack is not None and all(self.loss_grad(p) is not None for p in params):
                    self._zero_pass_packed(params, pack, [dead_of[id(p)] for p in params], lr, theta_old)
                else:
                    singles += params
        for p in singles:
            g = self.loss_grad(p)
            if g is None:
                continue
            U, W = self._factors(p)
            if self.fast:
                cpu.element_zero_pass_(U, W, g, theta_old(p), dead_of[id(p)], self.kappa, lr, thr)
            else:
                new_U, new_W = ref.element_zero_pass(U, W, g, theta_old(p), dead_of[id(p)], self.kappa, lr, thr)
                U.copy_(new_U)
                W.copy_(new_W)
            write_product(local(p), U, W)

    def _zero_pass_packed(self, params, pack: cpu.Pack, dead, lr: float, theta_old: Theta) -> None:
        Us, Ws = zip(*(self._factors(p) for p in params))
        U, W = pack.flat(Us), pack.flat(Ws)
        g = pack.flat([self.loss_grad(p) for p in params])
        cpu.element_zero_pass_(U, W, g, pack.flat([theta_old(p) for p in params]), pack.flat(dead), self.kappa, lr,
                               self.group["zero_threshold"])
        pack.scatter_(U, Us)
        pack.scatter_(W, Ws)
        thetas = [local(p) for p in params]
        if all(t.dtype == U.dtype for t in thetas):
            pack.scatter_(U * W, thetas)
        else:
            for theta, u, w in zip(thetas, Us, Ws):
                write_product(theta, u, w)

    def write_theta(self) -> None:
        for p in self.params:
            write_product(local(p), *self._factors(p))

    def revived(self) -> bool:
        """Whether the zero pass revived an entry that was dead at :meth:`begin`."""
        for p, dead in zip(self.params, self._dead):
            if bool((dead.bool() & ~self.dead_rule(*self._factors(p))).any()):
                return True
        return False

    def fused_step(self, base_cls: type, grad_scale=None, found_inf=None) -> None:
        """The whole step in one fused path (Triton, or compiled for CPU): factor gradients, base rule, zero pass,
        theta."""
        _fused.step_element(self.path, base_cls, self.group, self.params, self.state, grad_scale, found_inf)

    def kkt(self) -> float:
        worst = 0.0
        for p in self.params:
            g = self.loss_grad(p)
            if g is not None and g.numel():
                worst = _max(worst, float(ref.element_kkt(local(p.detach()), g, self.kappa)))
        return worst


class Grouped(Kind):
    """Group sparsity: ``theta_g = u_g*W_g``, penalty ``2*kappa*sum_g ||theta_g||_2``.

    One ``u`` per share set: every parameter alone, or all of the param group together (``share_groups``).
    ``u`` lives in the state of the set's first parameter."""

    factor_keys = ("u", "W")
    dead_rule = staticmethod(ref.group_dead)
    one_dtype = True

    def __init__(self, group: dict, index: int, state, path: str = "spec", comm=LOCAL, scratch=None, structures=None):
        super().__init__(group, index, state, path, comm, scratch)
        self.sets = [self.params] if group["share_groups"] else [[p] for p in self.params]
        self.shared = bool(group["share_groups"]) and len(self.params) > 1
        if group["share_groups"] and len({(is_dtensor(p), is_sharded(p)) for p in self.params}) > 1:
            raise ValueError(f"{self.where}: 'share_groups'=True needs its parameters sharded alike "
                             "(all of them DTensors from fully_shard, or none)")
        cache = {} if structures is None else structures
        self.structures = {}
        for p in self.params:  # the structure of each parameter's local rows
            key = (p, id(group["sparsity"]), tuple(p.shape))
            if key not in cache:
                whole = GroupStructure(group["sparsity"], p.shape, p.device)
                cache[key] = whole.rows(*local_rows(p)) if is_sharded(p) else whole
            self.structures[p] = cache[key]
        dim0_groups = isinstance(group["sparsity"], str) and group["sparsity"] == "row"
        # a set spans shards when its groups are not whole on each rank (column or id groups of dim-0 shards)
        self.spans = [not dim0_groups and any(is_sharded(p) for p in members) for members in self.sets]
        self._pending: list = []

    @property
    def spans_shards(self) -> bool:
        return any(self.spans)

    def _locals(self, members):
        st = self.state
        return local(st[members[0]]["u"]), [local(st[p]["W"]) for p in members], [self.structures[p] for p in members]

    def ensure_factors(self) -> None:
        for k, members in enumerate(self.sets):
            have = ["W" in self.state[p] for p in members]
            if all(have):
                continue
            if any(have):
                raise ValueError(f"{self.where}: a shared set cannot gain members after its first step")
            total = (lambda x: self.comm.sum([x])[0]) if self.spans[k] else (lambda x: x)
            u, Ws = ref.init_group([local(p.detach()) for p in members], [self.structures[p] for p in members],
                                   self.group["init"], total=total)
            rows = isinstance(self.group["sparsity"], str) and self.group["sparsity"] == "row"
            for i, (p, W) in enumerate(zip(members, Ws)):
                self.state[p].update(W=like(W, p), base={"W": {}})
                if i == 0:
                    self.state[p]["u"] = vector_like(u, p, rows=rows and not self.spans[k])
                    self.state[p]["base"]["u"] = {}

    def _drop_grads(self, members) -> None:
        """No factor gradients for a set none of whose parameters has a gradient (the base leaves them alone)."""
        self.state[members[0]]["u"].grad = None
        for p in members:
            self.state[p]["W"].grad = None

    def _grads(self, members):
        """The loss gradients of a set, and whether any exists; a member without one counts as zero."""
        grads = [self.loss_grad(p) for p in members]
        return grads, any(g is not None for g in grads)

    def _filled(self, grads, Ws):
        return [torch.zeros_like(W) if g is None else g for g, W in zip(grads, Ws)]

    def begin(self) -> list:
        """Adopt the weights written outside the optimizer, then remember the dead groups. For sets spanning
        shards, ``||W_g||^2`` and the count of changed weights need the other ranks (see :meth:`end_begin`)."""
        self._dead, self._pending = [], []
        parts = []
        for k, members in enumerate(self.sets):
            u, Ws, structures = self._locals(members)
            thetas = [local(p.detach()) for p in members]
            changed = ref.group_changed(u, Ws, thetas, structures)
            if self.spans[k]:
                self._dead.append(None)
                self._pending.append(k)
                parts += [ref.group_dots(Ws, Ws, structures), changed]
                continue
            if bool(changed.any()):
                self._adopt(k, changed)
            self._dead.append(self.dead_rule(u, ref.group_dots(Ws, Ws, structures)))
        return parts

    def _adopt(self, k: int, changed: torch.Tensor) -> None:
        members = self.sets[k]
        u, Ws, structures = self._locals(members)
        total = (lambda x: self.comm.sum([x])[0]) if self.spans[k] else (lambda x: x)
        new_u, new_Ws = ref.group_adopt(u, Ws, [local(p.detach()) for p in members], structures, self.group["init"],
                                        changed, total)
        u.copy_(new_u)
        for W, new_W in zip(Ws, new_Ws):
            W.copy_(new_W)

    def end_begin(self, reduced: Sequence[torch.Tensor]) -> bool:
        """Complete :meth:`begin` with its parts summed over ranks. Returns True when a weight of a spanning set
        was written outside the optimizer (on any rank): that set is then adopted (which needs the other ranks
        again) and the step must start over."""
        adopted = False
        for i, k in enumerate(self._pending):
            w_sq, changed = reduced[2 * i], reduced[2 * i + 1]
            if bool(changed.any()):
                self._adopt(k, changed)
                adopted = True
            self._dead[k] = self.dead_rule(local(self.state[self.sets[k][0]]["u"]), w_sq)
        self._pending = []
        return adopted

    def grad_sums(self) -> list:
        """``sum g*W`` of the sets spanning shards (the loss part of ``du``), to be summed over ranks."""
        parts = []
        for k, members in enumerate(self.sets):
            if self.spans[k]:
                _, Ws, structures = self._locals(members)
                grads, _ = self._grads(members)
                parts.append(ref.group_dots(self._filled(grads, Ws), Ws, structures))
        return parts

    def set_W_grads_first(self) -> list[torch.Tensor]:
        """For sets spanning shards: ``W``'s gradient (local: it needs ``u``, not sums); returns those leaves."""
        leaves = []
        for k, members in enumerate(self.sets):
            if not self.spans[k]:
                continue
            u, Ws, structures = self._locals(members)
            for p, W, s in zip(members, Ws, structures):
                g = self.loss_grad(p)
                leaf = self.state[p]["W"]
                leaf.grad = None if g is None else like(ref.group_W_grad(g, u, W, s, self.kappa), leaf)
                if g is not None:
                    leaves.append(leaf)
        return leaves

    def set_factor_grads(self, reduced=(), skip_W: bool = False) -> None:
        """``reduced``: :meth:`grad_sums` summed over ranks; ``skip_W``: the ``W`` of spanning sets were moved
        already (:meth:`set_W_grads_first`): only their ``u`` gets a gradient."""
        gW = dict(zip([k for k in range(len(self.sets)) if self.spans[k]], reduced))
        for k, members, u, Ws, structures, grads in self._sets_with_grads():
            st0 = self.state[members[0]]
            if skip_W and self.spans[k]:
                st0["u"].grad = like(gW[k] + 2 * self.kappa * u, st0["u"])
                for p in members:
                    self.state[p]["W"].grad = None
                continue
            du, dWs = ref.group_factor_grads(self._filled(grads, Ws), u, Ws, structures, self.kappa, gW=gW.get(k))
            st0["u"].grad = like(du, st0["u"])
            for p, dW, g in zip(members, dWs, grads):
                self.state[p]["W"].grad = None if g is None else like(dW, self.state[p]["W"])

    def _sets_with_grads(self):
        """``(k, members, u, Ws, structures, grads)`` of each share set that has a gradient; a set without one has
        its factors' gradients dropped (it does not move)."""
        for k, members in enumerate(self.sets):
            grads, live = self._grads(members)
            if not live:
                self._drop_grads(members)
                continue
            yield (k, members, *self._locals(members), grads)

    def _finish_inputs(self, theta_old: Theta, spanning_only: bool = False):
        for k, members in enumerate(self.sets):
            if spanning_only and not self.spans[k]:
                continue
            grads, live = self._grads(members)
            if live:
                u, Ws, structures = self._locals(members)
                yield k, members, u, Ws, structures, self._filled(grads, Ws), [theta_old(p) for p in members]

    def finish_sums(self, theta_old: Theta = _theta_now) -> list:
        """The zero pass's per-group sums of sets spanning shards (the others are summed in :meth:`zero_pass`)."""
        return [ref.group_finish_sums(Ws, grads, olds, structures)
                for k, _, _, Ws, structures, grads, olds in self._finish_inputs(theta_old, spanning_only=True)]

    def zero_pass(self, lr: float, theta_old: Theta = _theta_now, reduced=()) -> None:
        """``reduced``: :meth:`finish_sums` summed over ranks, in order."""
        reduced = iter(reduced)
        thr = self.group["zero_threshold"]
        for k, members, u, Ws, structures, grads, olds in list(self._finish_inputs(theta_old)):
            sums = next(reduced) if self.spans[k] else ref.group_finish_sums(Ws, grads, olds, structures)
            new_u, new_Ws = ref.group_zero_pass(u, Ws, grads, sums, structures, self._dead[k], self.kappa, lr, thr)
            u.copy_(new_u)
            for W, new_W in zip(Ws, new_Ws):
                W.copy_(new_W)
            self._write(members, u, Ws, structures)

    def _write(self, members, u, Ws, structures) -> None:
        for p, W, s in zip(members, Ws, structures):
            local(p).copy_(s.expand(u) * W)

    def write_theta(self) -> None:
        for members in self.sets:
            self._write(members, *self._locals(members))

    def revived(self) -> bool:
        for k, members in enumerate(self.sets):
            u, Ws, structures = self._locals(members)
            after = self.dead_rule(u, ref.group_dots(Ws, Ws, structures))
            if bool((self._dead[k] & ~after).any()):
                return True
        return False

    def fused_step(self, base_cls: type, grad_scale=None, found_inf=None) -> None:
        """The whole step in one fused path (Triton, or compiled for CPU): factor gradients, base rule, zero pass,
        theta."""
        _fused.step_grouped(self.path, base_cls, self.group, self.sets, self.structures, self.state, grad_scale, found_inf)

    def kkt(self) -> float:
        worst = 0.0
        for k, members in enumerate(self.sets):
            live = [(p, self.loss_grad(p)) for p in members]
            live = [(p, g) for p, g in live if g is not None and p.numel()]
            if not live:
                continue
            total = (lambda x: self.comm.sum([x])[0]) if self.spans[k] else (lambda x: x)
            value = ref.group_kkt([local(p.detach()) for p, _ in live], [g for _, g in live],
                                  [self.structures[p] for p, _ in live], self.kappa, total=total)
            worst = _max(worst, float(value))
        return worst


def _max(a: float, b: float) -> float:
    """``max`` that keeps a NaN (Python's ``max(0.0, nan)`` drops it)."""
    return b if b != b or b > a else a


def _reusable(buffer: torch.Tensor | None, like_: torch.Tensor) -> torch.Tensor | None:
    """Last step's gradient buffer of a large factor, to be overwritten (a fresh large allocation costs page
    faults on CPU); None for small factors (one foreach op for all of them is cheaper)."""
    if buffer is None or like_.numel() < cpu.CHUNK or buffer.shape != like_.shape or buffer.dtype != like_.dtype:
        return None
    return buffer if buffer.device == like_.device and buffer.is_contiguous() else None


def probes(grads: list[torch.Tensor]) -> list:
    """Per gradient a probe, 0 when it is finite: float32/float64 CPU gradients are read by the native check when it is built
    (:func:`native.nonfinite`, the fastest, all in one call; its probes are the ints 0 and 1), tiny ones otherwise in
    one foreach call, others by ``aminmax``; a GPU gradient counts its non-finite entries on the device."""
    use_native = native.unavailable() is None
    if use_native and all(g.is_cpu and g.dtype in native.DTYPES and g.is_contiguous() for g in grads):
        return native.nonfinite(grads)  # (the usual case on a CPU: every probe in one call)
    out: list = [None] * len(grads)
    tiny, checked = [], []
    for i, g in enumerate(grads):
        if not g.is_cpu:
            out[i] = (~torch.isfinite(g)).sum()
        elif use_native and g.dtype in native.DTYPES and g.is_contiguous():
            checked.append(i)
        elif 0 < g.numel() <= cpu.PROBE_TOGETHER_MAX:
            tiny.append(i)
        else:
            out[i] = cpu.nonfinite_probe(g)
    for i, bad in zip(checked, native.nonfinite([grads[i] for i in checked])):
        out[i] = bad
    for i, probe in zip(tiny, cpu.nonfinite_probes([grads[i] for i in tiny])):
        out[i] = probe
    return out


def make_kind(group: dict, index: int, state, path: str, comm=LOCAL, scratch=None, structures=None) -> Kind:
    """The kind object of sparse param group ``index``."""
    if group.get("depth", 2) != 2:  # depth-k factors, L_{2/k}: spread_optim/deep.py
        from spread_optim.deep import make_deep_kind

        return make_deep_kind(group, index, state, path, comm, scratch, structures)
    sparsity = group["sparsity"]
    if isinstance(sparsity, str) and sparsity == "element":
        return Element(group, index, state, path, comm, scratch)
    return Grouped(group, index, state, path, comm, scratch, structures)
