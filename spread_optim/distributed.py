r"""Spread under ``torch.distributed``: DDP, FSDP2 (DTensor parameters sharded on dim 0), ZeRO.

**DDP** (``DistributedDataParallel``): every rank holds whole parameters and the same all-reduced
gradient, so every rank computes the same update. Nothing in this module is used; spread adds no
collective.

**FSDP2** (``torch.distributed.fsdp.fully_shard``): a parameter is a DTensor sharded on dim 0 of a
1-D device mesh. Its factors are DTensors too (``state_dict()`` then holds sharded tensors, which
``torch.distributed.checkpoint`` saves and reshards): ``U``, ``W`` and the base's state for them with the
parameter's placement, ``u`` of row groups sharded like the rows, ``u`` of column / group-id groups (they
span shards) replicated. The base optimizer steps the DTensor factors (elementwise: local). Spread's own
arithmetic (:mod:`spread_optim.kernels.reference`, the one definition of the update) runs on the local
shards. Per step, for all parameters together, one all-reduce of one flat buffer
(:meth:`ShardedSpread.step_one_round`) carries:

- the count of non-finite gradient entries per parameter (so that every rank raises, or none);
- for groups that span shards: ``||W||^2`` at the step's start (which groups sit on the zero saddle),
  ``sum g*W`` (the loss part of ``du``), and the exact-zero sums ``||g||^2``, ``||W_new||^2``,
  ``||theta_old||^2``, ``<W_new, theta_old>``. ``W_new`` is known before the all-reduce because ``W``'s
  gradient ``u g + 2 kappa W`` is local (``u`` is replicated): the base moves the spanning groups' ``W``
  first, keeping a copy of them and their state to undo on another rank's NaN, and everything else after.

Bases other than torch's per-parameter rules (LBFGS, a user's class) take the two-round path instead:
one all-reduce before the base step (flags, saddle norms, ``sum g*W``), one after it (zero sums).
Element and row sparsity need no sums across shards: for them only the flags are exchanged. The first
step adds up to two all-reduces per group spanning shards (``init="balanced"`` splits by global norms).
``kkt_residual()`` and ``sparsity_report`` reduce their counts and maxima across ranks.

**ZeRO** (``ZeroRedundancyOptimizer(params, optimizer_class=SpreadAdam, ...)``): each rank keeps the
factors of the parameters it owns, which is exact for per-parameter groups; ``share_groups`` is refused
there (ZeRO may give the parameters sharing a factor to different ranks).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from spread_optim.kernels import reference as ref



def _dtensor_cls():
    """``DTensor`` if ``torch.distributed.tensor`` is loaded (if not, no tensor can be one: importing it
    here would add seconds to ``import spread_optim``)."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def is_dtensor(t) -> bool:
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def _local_shape_and_offset(p):
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)


def local(t):
    """The local shard of a DTensor (a view: writing to it writes the DTensor), else ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def _is_sharded(t) -> bool:
    return is_dtensor(t) and t.placements[0].is_shard(0)


def _like(local_tensor: torch.Tensor, template) -> torch.Tensor:
    """``local_tensor`` as a DTensor laid out as ``template`` (its local shard), or as is."""
    if not is_dtensor(template):
        return local_tensor
    return _dtensor_cls().from_local(local_tensor, template.device_mesh, template.placements, run_check=False,
                              shape=template.shape, stride=template.stride())


def inside_zero() -> bool:
    """Whether the optimizer being built is the local optimizer of a ``ZeroRedundancyOptimizer``."""
    zero = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    if zero is None:
        return False
    frame = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            return False
        if isinstance(frame.f_locals.get("self"), zero.ZeroRedundancyOptimizer):
            return True
        frame = frame.f_back
    return False


def check_not_zero_shared(group, where: str) -> None:
    """``share_groups`` cannot be split over ranks: refuse it under ZeRO, naming the alternatives."""
    if group["share_groups"] and group["kappa"] > 0 and inside_zero():
        raise ValueError(
            f"{where}: 'share_groups'=True is not supported under ZeroRedundancyOptimizer (it may place the "
            "parameters that share a factor on different ranks); use FSDP2 (torch.distributed.fsdp.fully_shard) "
            "or DistributedDataParallel with the plain optimizer"
        )


def _sparse_params(opt):
    """Parameters of the sparse groups (called before the groups are validated: a bad kappa is not sparse)."""
    kappas = [float(k) if isinstance(k, torch.Tensor) and k.numel() == 1 else k for k in (g["kappa"] for g in opt.param_groups)]
    return [p for g, k in zip(opt.param_groups, kappas)
            if isinstance(k, (int, float)) and not isinstance(k, bool) and k > 0 for p in g["params"]]


def sharded(opt):
    """The optimizer's :class:`ShardedSpread`, or None when no parameter of a sparse group is a DTensor."""
    params = _sparse_params(opt)
    if not any(is_dtensor(p) for p in params):
        opt._sharded = None
        return None
    key = tuple(id(p) for p in params)
    helper = getattr(opt, "_sharded", None)
    if helper is None or helper.key != key:
        helper = opt._sharded = ShardedSpread(opt, key)
    return helper


def _process_group(opt):
    """The process group over which the sparse DTensor parameters are sharded (None: nothing is)."""
    groups = []
    ids = {id(p) for p in _sparse_params(opt)}
    for p, where in ((p, f"param group {i}") for i, g in enumerate(opt.param_groups) for p in g["params"]):
        if id(p) not in ids or not is_dtensor(p):
            continue
        mesh = p.device_mesh
        if mesh.ndim != 1 or not (p.placements[0].is_shard(0) or p.placements[0].is_replicate()):
            raise ValueError(
                f"{where}: spread supports DTensor parameters sharded on dim 0 of a 1-D device mesh (FSDP2's "
                f"fully_shard) or replicated, got placements {tuple(p.placements)} on a {mesh.ndim}-D mesh"
            )
        if p.placements[0].is_shard(0) and all(g is not mesh.get_group() for g in groups):
            groups.append(mesh.get_group())
    if len(groups) > 1:
        raise ValueError(f"{where}: the sharded parameters of spread's sparse groups must share one device mesh")
    return groups[0] if groups else None


class ShardedSpread:
    """The per-step spread update of an optimizer whose sparse parameters are (some of them) DTensors.

    Mirrors ``SpreadOptimizer``'s ``_check_grads``, ``_set_factor_grads``, ``_dead_masks``, ``_finish``,
    ``_write_theta`` and ``kkt_residual`` on local shards, with the batched all-reduces of the module
    docstring. Parameters that are plain tensors take the same path with nothing to reduce.
    """

    def __init__(self, opt, key):
        self.opt, self.key = opt, key
        sparse = _sparse_params(opt)
        self.group = _process_group(opt)
        ids = {id(p) for p in sparse}
        for index, g in enumerate(opt.param_groups):
            if g["share_groups"] and len({(is_dtensor(p), _is_sharded(p)) for p in g["params"] if id(p) in ids}) > 1:
                raise ValueError(f"param group {index}: 'share_groups'=True needs its parameters sharded alike "
                                 "(all of them DTensors from fully_shard, or none)")
        self.device = next(p.device for p in sparse if is_dtensor(p))  # where the flat buffers live (NCCL: the GPU)
        self._structs: dict = {}
        self._dead = None  # (masks, pending [(set index, u == 0, partial ||W||^2)])
        self._gW = None  # set index -> sum g*W over whole groups, from the last pre-step round

    # ---------------------------------------------------------------------------------------------
    # helpers

    def _all_reduce(self, parts, op=None):
        """Sum (or ``op``) every tensor of ``parts`` across the shards' ranks, in one flat buffer."""
        if not parts:
            return []
        if self.group is None:
            return list(parts)
        flat = torch.cat([x.reshape(-1).to(torch.float64) for x in parts])
        dist.all_reduce(flat, op=op or dist.ReduceOp.SUM, group=self.group)
        out, i = [], 0
        for x in parts:
            out.append(flat[i:i + x.numel()].reshape(x.shape).to(x.dtype))
            i += x.numel()
        return out

    def _sum(self, x):
        return self._all_reduce([x])[0]

    def _structure(self, p, group):
        cached = self._structs.get(p)
        if cached is None or cached[0] is not group["sparsity"]:
            full = self.opt._structure(p, group)
            if _is_sharded(p):
                shape, offset = _local_shape_and_offset(p)
                full = full.rows(offset[0], shape[0])
            cached = self._structs[p] = (group["sparsity"], full)
        return cached[1]

    @staticmethod
    def _spans(group, members) -> bool:
        """Groups of this set span shards: column / id groups of parameters sharded on dim 0."""
        return not (isinstance(group["sparsity"], str) and group["sparsity"] in ("element", "row")) and any(
            _is_sharded(p) for p in members)

    def _sets(self):
        for group, members in self.opt._sparse_params():
            yield group, members, self._spans(group, members)

    def _grad(self, p, group):
        g = local(p.grad)
        if g is None:
            return None
        g = g.to(ref.factor_dtype(p.dtype))
        return -g if group.get("maximize", False) else g

    def _group_locals(self, group, members):
        st = self.opt.state
        return (local(st[members[0]]["u"]), [local(st[p]["W"]) for p in members],
                [self._structure(p, group) for p in members])

    # ---------------------------------------------------------------------------------------------
    # factors

    def init_group(self, members, group):
        """``ref.init_group`` on the local shards; ``u`` is sharded like the rows or replicated."""
        structures = [self._structure(p, group) for p in members]
        spans = self._spans(group, members)
        u, Ws = ref.init_group([local(p.detach()) for p in members], structures, group["init"],
                               sum_groups=self._sum if spans else None)
        Ws = [_like(W, p) for W, p in zip(Ws, members)]
        p = members[0]
        if is_dtensor(p):
            from torch.distributed.tensor import Replicate, Shard

            row_sharded = _is_sharded(p) and not spans
            n = p.shape[0] if row_sharded else u.shape[0]
            u = _dtensor_cls().from_local(u, p.device_mesh, [Shard(0) if row_sharded else Replicate()], run_check=False,
                                          shape=(n,), stride=(1,))
        return u, Ws

    # ---------------------------------------------------------------------------------------------
    # one step

    def dead_masks(self):
        masks, pending = [], []
        for k, (group, members, spans) in enumerate(self._sets()):
            st = self.opt.state
            if self.opt._is_element(group):
                masks.append([ref.element_dead(local(st[p]["U"]), local(st[p]["W"])) for p in members])
                continue
            u, Ws, structures = self._group_locals(group, members)
            if spans:
                masks.append(None)  # completed by the next all-reduce
                pending.append((k, u == 0, ref.group_sq_sums(Ws, structures)))
            else:
                masks.append(ref.group_dead(u, Ws, structures))
        self._dead = (masks, pending)
        return masks

    def _flag_counts(self):
        """This rank's count of non-finite gradient entries per parameter of the sparse groups (refusing
        sparse and complex gradients), and ``(param group index, shape)`` of each."""
        flags, names = [], []
        for index, group in enumerate(self.opt.param_groups):
            if not self.opt._is_sparse(group):
                continue
            for p in group["params"]:
                g = local(p.grad)
                if g is None:
                    continue
                if g.is_sparse:
                    raise TypeError(f"param group {index}: sparse gradients are not supported in a sparse group (parameter of shape {tuple(p.shape)})")
                if g.is_complex():
                    raise TypeError(f"param group {index}: complex gradients are not supported in a sparse group")
                flags.append((~torch.isfinite(g)).sum())
                names.append((index, tuple(p.shape)))
        return ([torch.stack(flags)] if flags else []), names

    @staticmethod
    def _raise_if_nonfinite(bad_counts, names) -> None:
        if bad_counts is not None and bool((bad_counts > 0).any()):
            bad = [names[i] for i in torch.nonzero(bad_counts > 0).flatten().tolist()]
            raise FloatingPointError(
                "non-finite gradient in " + ", ".join(f"param group {i} (parameter of shape {s})" for i, s in bad)
                + "; nothing was updated (use torch.amp.GradScaler or skip this batch)"
            )

    def _complete_dead(self, reduced_w_sq) -> None:
        """The pending zero-saddle masks of spanning groups, from their all-reduced ``||W||^2``."""
        if self._dead is None:
            return
        for (k, u_zero, _), w_sq in zip(self._dead[1], reduced_w_sq):
            self._dead[0][k] = u_zero & (w_sq == 0)
        self._dead = (self._dead[0], [])

    def _spanning_grads(self):
        """``(set index, group, members, grads, grads with zeros for None)`` of each set spanning shards
        that has a gradient."""
        for k, (group, members, spans) in enumerate(self._sets()):
            if not spans or self.opt._is_element(group):
                continue
            grads = [self._grad(p, group) for p in members]
            if any(g is not None for g in grads):
                Ws = [local(self.opt.state[p]["W"]) for p in members]
                yield k, group, members, grads, [torch.zeros_like(W) if g is None else g for g, W in zip(grads, Ws)]

    def _pre_step_parts(self, spanning):
        """The all-reduce parts known at the step's start: the non-finite counts, the pending zero-saddle
        norms and ``sum g*W`` of each ``spanning`` set; with the layout :meth:`_read_pre_step` needs."""
        parts, names = self._flag_counts()
        pending = self._dead[1] if self._dead is not None else []
        layout = (bool(parts), len(pending), names)
        parts += [w_sq for _, _, w_sq in pending]
        for _, group, members, _, filled in spanning:
            _, Ws, structures = self._group_locals(group, members)
            parts.append(ref.group_gW(filled, Ws, structures))
        return parts, layout

    def _read_pre_step(self, reduced, layout, spanning):
        """Complete the dead masks from the reduced parts; return the counts (None without gradients),
        the names, the ``g*W`` sums by set index, and the parts after them."""
        has_flags, n_pending, names = layout
        bad_counts = reduced.pop(0) if has_flags else None
        self._complete_dead(reduced[:n_pending])
        reduced = reduced[n_pending:]
        return bad_counts, names, {k: x for (k, *_), x in zip(spanning, reduced)}, reduced[len(spanning):]

    def check_grads(self):
        """``_check_grads`` with the same answer on every rank, and the pre-step sums (one all-reduce)."""
        spanning = list(self._spanning_grads())
        parts, layout = self._pre_step_parts(spanning)
        bad_counts, names, self._gW, _ = self._read_pre_step(self._all_reduce(parts), layout, spanning)
        self._raise_if_nonfinite(bad_counts, names)

    # ---------------------------------------------------------------------------------------------
    # one step, one all-reduce

    def one_round(self, base) -> bool:
        """Whether :meth:`step_one_round` applies: some group spans shards, and the base is one of
        torch's per-parameter rules (stepping two subsets of its parameters in two calls is then the
        same as one call, and it leaves parameters without a gradient alone)."""
        cls = type(base)
        return (self.group is not None and cls.__module__.startswith("torch.optim.")
                and not isinstance(base, torch.optim.LBFGS)
                and any(spans and not self.opt._is_element(g) for g, _, spans in self._sets()))

    def step_one_round(self, base, dead) -> None:
        """One step with a single all-reduce when groups span shards.

        ``W`` of a spanning group needs only local data (``dW = u g + 2 kappa W``, with ``u`` replicated),
        so the base moves these first (phase 1, after a snapshot of them and their state). One all-reduce
        then carries the non-finite flags, the pending zero-saddle norms, ``sum g*W_old`` (for ``du``) and
        the exact-zero sums of the moved ``W`` (:func:`~spread_optim.kernels.reference.group_finish_sums`).
        On a non-finite gradient on any rank, phase 1 is undone and every rank raises. Else the base moves
        every other factor and dense parameter (phase 2), and the zero pass finishes the step.
        """
        st = self.opt.state
        spanning = list(self._spanning_grads())
        parts, layout = self._pre_step_parts(spanning)  # with W_old
        first = []  # the W leaves of phase 1
        for k, group, members, grads, filled in spanning:
            u, Ws, structures = self._group_locals(group, members)
            for p, g, W, s in zip(members, grads, Ws, structures):
                if g is not None:
                    leaf = st[p]["W"]
                    leaf.grad = _like(ref.group_W_grad(g, u, W, s, group["kappa"]), leaf)
                    first.append(leaf)
        saved = [(leaf, local(leaf).clone(), _clone_state(base.state[leaf])) for leaf in first]
        _step_only(base, first)  # phase 1
        for k, group, members, _, filled in spanning:
            _, Ws, structures = self._group_locals(group, members)
            parts.append(ref.group_finish_sums(Ws, filled, [local(p) for p in members], structures))
        bad_counts, names, gW_sums, rest = self._read_pre_step(self._all_reduce(parts), layout, spanning)
        finish_sums = {k: x for (k, *_), x in zip(spanning, rest)}
        if bad_counts is not None and bool((bad_counts > 0).any()):
            for leaf, value, state in saved:
                local(leaf).copy_(value)
                base.state[leaf].clear()
                base.state[leaf].update(state)
            self._raise_if_nonfinite(bad_counts, names)
        del saved
        self._gW = gW_sums
        self.set_factor_grads(w_stepped=set(finish_sums))  # phase 2
        base.step()
        self.finish(dead, sums=finish_sums)

    def set_factor_grads(self, with_penalty: bool = False, w_stepped=frozenset()):
        """``_set_factor_grads`` on the local shards; ``w_stepped``: sets (by index) whose ``W`` the base
        has moved already (:meth:`step_one_round`): only their ``u`` gets a gradient."""
        if self._gW is None:
            self.check_grads()
        gW_sums, self._gW = self._gW, None
        st = self.opt.state
        total = None
        for k, (group, members, spans) in enumerate(self._sets()):
            kappa = group["kappa"]
            grads = [self._grad(p, group) for p in members]
            if self.opt._is_element(group):
                for p, g in zip(members, grads):
                    if g is None:
                        st[p]["U"].grad = st[p]["W"].grad = None
                live = [(p, g) for p, g in zip(members, grads) if g is not None]
                if live:
                    gU, gW = ref.element_factor_grads([g for _, g in live], [local(st[p]["U"]) for p, _ in live],
                                                      [local(st[p]["W"]) for p, _ in live], kappa)
                    for (p, _), a, b in zip(live, gU, gW):
                        st[p]["U"].grad, st[p]["W"].grad = _like(a, st[p]["U"]), _like(b, st[p]["W"])
                if with_penalty:
                    total = self._penalty_part(group, members, total)
                continue
            u_dt = st[members[0]]["u"]
            u, Ws, structures = self._group_locals(group, members)
            if all(g is None for g in grads):
                u_dt.grad = None
                for p in members:
                    st[p]["W"].grad = None
            else:
                if k in w_stepped:
                    u_dt.grad = _like(2.0 * kappa * u + gW_sums[k], u_dt)
                    for p in members:
                        st[p]["W"].grad = None
                else:
                    filled = [torch.zeros_like(W) if g is None else g for g, W in zip(grads, Ws)]
                    du, dWs = ref.group_factor_grads(filled, u, Ws, structures, kappa, gW=gW_sums.get(k) if spans else None)
                    u_dt.grad = _like(du, u_dt)
                    for p, dW, g in zip(members, dWs, grads):
                        st[p]["W"].grad = None if g is None else _like(dW, st[p]["W"])
            if with_penalty:
                total = self._penalty_part(group, members, total)
        if with_penalty:
            total = torch.zeros((), dtype=torch.float64, device=self.device) if total is None else total
            return self._sum(total)
        return 0.0

    def finish(self, dead, theta_start=None, sums=None):
        """``_finish`` on the local shards. ``sums``: set index -> all-reduced finish sums of the
        spanning sets (:meth:`step_one_round`), else they are reduced here."""
        if self._dead is not None and self._dead[1] and self._dead[0] is dead:
            self._complete_dead(self._all_reduce([w for _, _, w in self._dead[1]]))
        old = (lambda p: local(theta_start[p])) if theta_start is not None else local
        st = self.opt.state
        sets = []
        post = []
        for k, (group, members, spans) in enumerate(self._sets()):
            grads = [self._grad(p, group) for p in members]
            if self.opt._is_element(group) or all(g is None for g in grads):
                sets.append((group, members, spans, grads, None, None, k))
                continue
            u, Ws, structures = self._group_locals(group, members)
            filled = [torch.zeros_like(W) if g is None else g for g, W in zip(grads, Ws)]
            olds = [old(p) for p in members]
            if spans and sums is None:
                post.append(ref.group_finish_sums(Ws, filled, olds, structures))
            sets.append((group, members, spans, filled, olds, structures, k))
        reduced = iter(self._all_reduce(post))
        for (group, members, spans, grads, olds, structures, k), d in zip(sets, dead):
            kappa, thr, lr = group["kappa"], group["zero_threshold"], float(group.get("lr", 1.0))
            if self.opt._is_element(group):
                for p, g, dp in zip(members, grads, d):
                    if g is None:
                        continue
                    U, W = local(st[p]["U"]), local(st[p]["W"])
                    ref.element_finish(U, W, g, old(p), dp, kappa, lr, thr)
                    local(p).copy_(U * W)
                continue
            if olds is None:
                continue
            u, Ws, _ = self._group_locals(group, members)
            spanned = (next(reduced) if sums is None else sums[k]) if spans else None
            ref.group_finish(u, Ws, grads, olds, structures, d, kappa, lr, thr, sums=spanned)
            for p, W, s in zip(members, Ws, structures):
                local(p).copy_(s.expand(u) * W)

    def write_theta(self):
        st = self.opt.state
        for group, members, _ in self._sets():
            if self.opt._is_element(group):
                for p in members:
                    local(p).copy_(local(st[p]["U"]) * local(st[p]["W"]))
            else:
                u, Ws, structures = self._group_locals(group, members)
                for p, W, s in zip(members, Ws, structures):
                    local(p).copy_(s.expand(u) * W)

    # ---------------------------------------------------------------------------------------------
    # diagnostics

    def _penalty_part(self, group, members, total):
        """``total`` plus this rank's part of the set's penalty: its shards, and replicated factors on rank 0
        only, so that the sum over ranks is the penalty."""
        mine = self.group is None or dist.get_rank(self.group) == 0
        factors = [local(t) for p in members for _, t in self.opt._factor_leaves(p) if _is_sharded(t) or mine]
        if not factors:
            return total
        part = ref.penalty(factors, group["kappa"])
        return part if total is None else total + part

    def penalty(self) -> float:
        total = None
        for group, members, _ in self._sets():
            total = self._penalty_part(group, members, total)
        total = torch.zeros((), dtype=torch.float64, device=self.device) if total is None else total
        return float(self._sum(total))

    def kkt_residual(self) -> float:
        worst = 0.0
        for group, members, spans in self._sets():
            kappa = group["kappa"]
            if self.opt._is_element(group):
                for p in members:
                    g = self._grad(p, group)
                    if g is not None and g.numel():
                        worst = max(worst, float(ref.element_kkt(local(p), g, kappa)))
                continue
            live = [(p, self._grad(p, group)) for p in members]
            live = [(p, g) for p, g in live if g is not None and p.numel()]
            if not spans:  # groups within the local shard
                live = [(p, g) for p, g in live if g.numel()]
            if live:
                structures = [self._structure(p, group) for p, _ in live]
                worst = max(worst, float(ref.group_kkt([local(p) for p, _ in live], [g for _, g in live], structures,
                                                       kappa, sum_groups=self._sum if spans else None)))
        return float(self._all_reduce([torch.tensor([worst], dtype=torch.float64, device=self.device)], op=dist.ReduceOp.MAX)[0])


def _clone_state(state: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _step_only(base, leaves):
    """``base.step()`` over ``leaves`` only: the other parameters' gradients are hidden for the call and
    put back after it."""
    keep = {id(t) for t in leaves}
    hidden = [(p, p.grad) for g in base.param_groups for p in g["params"] if p.grad is not None and id(p) not in keep]
    for p, _ in hidden:
        p.grad = None
    try:
        base.step()
    finally:
        for p, grad in hidden:
            p.grad = grad


def sparsity_rows(entries, make_row):
    """``sparsity_report`` rows of DTensor parameters, with one all-reduce of the sharded ones' counts.

    ``entries``: ``(name, p, kappa, sparsity)``; ``make_row(name, tensor, kappa, sparsity)`` builds the row
    of a whole (plain or replicated) tensor."""
    from spread_optim.report import ParamSparsity
    from spread_optim.structure import GroupStructure, describe

    rows, parts = [], []
    for name, p, kappa, sparsity in entries:
        data = local(p.detach())
        if not _is_sharded(p):
            row = make_row(name, data, kappa, sparsity)
            row.shape, row.numel = tuple(p.shape), p.numel()
            rows.append(row)
            continue
        kind = describe(sparsity)
        zeros = (data == 0).sum().to(torch.float64).reshape(1)
        if kind == "element" or p.dim() == 0 or (kind == "column" and p.dim() < 2):
            num_groups, counts, how = p.numel(), torch.cat([zeros, zeros]), "zeros"
        else:
            shape, offset = _local_shape_and_offset(p)
            structure = GroupStructure(sparsity, p.shape, data.device).rows(offset[0], shape[0])
            nonzero = structure.reduce((data != 0).to(torch.float64))
            if kind == "row":  # whole groups on each rank: count them locally
                num_groups, counts, how = p.shape[0], torch.cat([zeros, (nonzero == 0).sum().to(torch.float64).reshape(1)]), "zeros"
            else:  # column / ids: each group's nonzero count is summed over the shards
                num_groups, counts, how = structure.num_groups, torch.cat([zeros, nonzero]), "groups"
        row = ParamSparsity(name, tuple(p.shape), kappa, kind, p.numel(), 0, 0, num_groups)
        rows.append(row)
        parts.append((p.device_mesh.get_group(), counts, row, how))
    for group in {id(g): g for g, *_ in parts}.values():
        mine = [x for x in parts if x[0] is group]
        flat = torch.cat([t for _, t, _, _ in mine])
        dist.all_reduce(flat, group=group)
        i = 0
        for _, t, row, how in mine:
            total = flat[i:i + t.numel()]
            i += t.numel()
            row.zeros = int(total[0])
            row.zero_groups = int((total[1:] == 0).sum()) if how == "groups" else int(total[1])
    return rows
