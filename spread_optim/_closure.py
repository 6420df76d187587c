r"""``step(closure)`` for bases that evaluate the closure several times per step (LBFGS, a user's own class).

The base receives a wrapped closure: before each evaluation theta is rewritten from the factors the base has
moved, after it the gradients are checked and turned into factor gradients, and the base gets the smooth
objective ``loss + penalty``. After the base's step come the exact-zero pass and theta, as in any step, with
three things only a multi-evaluation base needs:

* the zero pass needs the gradient at the point the base accepted (LBFGS may end on a rejected line-search
  trial: then the closure is evaluated once more) and theta at the step's start;
* LBFGS's lr is a step along its quasi-Newton direction, not a step size in theta, so a revival's proximal step
  is found by backtracking (:func:`_zero_pass_backtracking`);
* LBFGS's curvature history is told about the zero pass's move (:func:`_tell_lbfgs`).

A failure at any evaluation (a non-finite gradient or loss, the closure's own exception) restores the
factors, the base's parameters and LBFGS's state to where the step started before it is raised.
"""

from __future__ import annotations

from typing import Callable

import torch

from spread_optim.distributed import local

Kinds = list


def _as_float(loss, where: str = "the closure") -> float:
    if loss is None:
        raise TypeError(f"{where} returned None; this base needs the loss (a tensor or a number) from the closure")
    return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)


def _plus(loss, penalty: torch.Tensor):
    """The smooth objective handed to the base: the closure's loss plus the penalty, in the loss's type."""
    if loss is None:
        return None
    if isinstance(loss, torch.Tensor):
        return loss.detach() + penalty
    return loss + float(penalty)


def gradless_factors(kinds: Kinds) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(leaf, copy)`` of the factors whose gradient is None: some bases (LBFGS) move a tensor without a
    gradient along their history; spread leaves it alone (see :func:`restore`)."""
    return [(leaf, leaf.detach().clone()) for k in kinds for _, _, leaf in k.factor_leaves() if leaf.grad is None]


def restore(saved) -> None:
    for leaf, value in saved:
        leaf.detach().copy_(value)


def _snapshot(tensors):
    return [(t, t.detach().clone()) for t in tensors]


def _copy_state(state: dict) -> dict:
    """A copy of LBFGS's state that its next iterations cannot change (it updates some tensors in place, and
    appends to and pops from its history lists)."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else list(v) if isinstance(v, list) else v for k, v in state.items()}


def _finite(loss) -> bool:
    return bool(torch.isfinite(loss).all()) if isinstance(loss, torch.Tensor) else loss == loss and abs(loss) != float("inf")


def step(kinds: Kinds, hidden, closure: Callable, *, factor_grads: Callable, penalty: Callable, zero_pass: Callable,
         lbfgs: bool, lr: float):
    """One step of a multi-evaluation base (module docstring). ``factor_grads(kinds, begin_parts=None)``: check
    the gradients and set the factor gradients; ``penalty(kinds)``: the penalty as a tensor;
    ``zero_pass(kinds, theta_old, revival_step)``: the exact-zero pass and theta."""
    begin = [k.begin() for k in kinds]
    first_loss: list = []
    last_loss: list = [None]  # the closure's own loss at its last evaluation
    gradless: list = []
    theta_start: dict = {}
    versions: list = []  # versions of the factor leaves at each evaluation
    base_params = [t for g in hidden.param_groups for t in g["params"]]
    # LBFGS moves factors and dense parameters at every line-search trial: what it had at the step's start, to put
    # back when a later evaluation fails (its history too: a failed step must not leave a pair in it)
    start = (_snapshot(base_params), _copy_state(hidden.first_state())) if lbfgs else None

    def spread_closure():
        with torch.no_grad():
            if first_loss:
                if not theta_start:  # second evaluation: p still holds theta of the step's start
                    theta_start.update((p, local(p.detach()).clone()) for k in kinds for p in k.params)
                for k in kinds:
                    k.write_theta()  # the base moved the factors since the last evaluation
        with torch.enable_grad():
            loss = closure()
        last_loss[0] = loss
        if loss is None and lbfgs:
            raise TypeError("the closure returned None; LBFGS needs the loss from it (return loss, as torch's LBFGS "
                            "requires); nothing was updated")
        if loss is not None and not _finite(loss):
            raise FloatingPointError(f"the closure returned a non-finite loss ({_as_float(loss)}); nothing was updated")
        with torch.no_grad():
            factor_grads(kinds, None if first_loss else begin)
            pen = penalty(kinds)
        if not first_loss:
            first_loss.append(loss)
            gradless.extend(gradless_factors(kinds))
        versions.append(_leaf_versions(kinds))
        return _plus(loss, pen)  # the base minimises the smooth objective

    try:
        hidden.step(spread_closure)
    except BaseException:  # a non-finite value, or the user's own error (a data loader, a KeyboardInterrupt)
        if start is not None:
            restore(start[0])
            state = hidden.first_state()
            state.clear()
            state.update(start[1])
            for k in kinds:
                k.write_theta()
        raise
    restore(gradless)
    base_point = [t.detach().clone() for t in base_params] if lbfgs else None  # where LBFGS left its tensors
    if len(versions) > 1:
        # a multi-evaluation base may end away from its last evaluation (a rejected line-search trial): the zero
        # pass needs the gradient at the accepted point, and theta at the step's start
        if versions[-1] != _leaf_versions(kinds):
            for k in kinds:
                k.write_theta()
            with torch.enable_grad():
                last_loss[0] = closure()
            factor_grads(kinds)
        theta_old = lambda p: theta_start[p]  # noqa: E731
    else:
        theta_old = None
    if not lbfgs:
        zero_pass(kinds, theta_old, None)
    elif kinds:
        _zero_pass_backtracking(kinds, hidden, closure, last_loss[0], theta_old, zero_pass, lr)
        _tell_lbfgs(kinds, hidden, base_point)
    return first_loss[0] if first_loss else None


def _leaf_versions(kinds: Kinds) -> list[int]:
    return [leaf._version for k in kinds for _, _, leaf in k.factor_leaves()]


def _zero_pass_backtracking(kinds: Kinds, hidden, closure, loss, theta_old, zero_pass, lr: float) -> None:
    """The zero pass for LBFGS: revival with a proximal-gradient step found by backtracking.

    LBFGS's lr (1 by default) is a step along its quasi-Newton direction, not a step size in theta: as the revival
    step ``|theta| = lr*(|g| - 2*kappa)`` it overshoots by the loss's curvature (a factor ~20 on an unscaled
    Gaussian lasso). So, as ISTA with backtracking (Beck & Teboulle 2009), a revival with step ``s`` is kept only
    if the loss at the new point satisfies the descent-lemma bound
    ``L(theta') <= L(theta) + <g, theta' - theta> + ||theta' - theta||^2 / (2*s)`` from the point ``theta`` where
    ``g = p.grad`` was evaluated (it holds whenever ``s <= 1/Lipschitz``); otherwise ``s`` is halved and the pass
    redone. The accepted ``s`` (never above lr) is where the next revival starts, kept with LBFGS's state under
    ``"spread_revival_step"``. One closure evaluation per step that revives something (and one per halving);
    ``p.grad`` is then the gradient at the new point."""
    state = hidden.first_state()
    step = min(lr, state.get("spread_revival_step", lr))
    refs = [(p, p.grad, p.detach().clone()) for k in kinds for p in k.params if p.grad is not None]
    if theta_old is None:  # p holds theta where g was evaluated, until a retry rewrites it
        start = {p: p.detach().clone() for k in kinds for p in k.params}
        theta_old = lambda p: start[p]  # noqa: E731
    factors = _snapshot([leaf for k in kinds for _, _, leaf in k.factor_leaves()])
    loss = _as_float(loss)
    for _ in range(60):
        zero_pass(kinds, theta_old, step)
        if not refs or not any(k.revived() for k in kinds):
            break
        with torch.enable_grad():
            trial = _as_float(closure())
        linear = quadratic = 0.0
        for p, g, theta in refs:
            delta = p.detach().double() - theta.double()
            linear += float((g.double() * delta).sum())
            quadratic += float(delta.pow(2).sum())
        bound = loss + linear + quadratic / (2 * step)
        slack = 32 * torch.finfo(refs[0][2].dtype).eps * (abs(loss) + abs(linear) + quadratic / (2 * step))
        if trial <= bound + slack:  # False for a NaN/inf trial
            break
        step /= 2
        for p, g, _ in refs:  # back to the point and the gradient the zero pass starts from
            p.grad = g
        restore(factors)
        for k in kinds:
            k.write_theta()
    state["spread_revival_step"] = step


def _tell_lbfgs(kinds: Kinds, hidden, base_point) -> None:
    """Tell LBFGS's curvature history about the zero pass's move of the factors.

    At its next iteration LBFGS pairs ``s = t*d`` (its last move, from where it took ``prev_flat_grad``) with
    ``y = grad - prev_flat_grad``. The zero pass moved the factors after that: ``s`` missed the move, ``y`` did
    not, and the bogus pair (tiny ``y.s``) gave directions ~1000x too long, which a short line search could not
    shorten: LBFGS froze far from the optimum. So (1) the real displacement goes into ``d`` (with ``t = 1``, which
    LBFGS reads only to form ``s``); if its last iteration stopped before moving (``prev_flat_grad . d >
    -tolerance_change``, its own test) the displacement is the zero pass's alone. (2) Entries held at zero
    (``U = W = 0``) are fixed until revived, as the active set of a bound-constrained quasi-Newton method: their
    coordinates are removed from every stored pair (pairs left with ``y.s <= 1e-10`` are dropped, as LBFGS drops
    them), else the history keeps moving them and the zero pass keeps moving them back.

    Without a line search (``line_search_fn=None``) LBFGS instead starts over after a zero pass that moved
    anything. LBFGS keeps its whole state in the entry of its first tensor; its counters are otherwise untouched."""
    params = hidden.param_groups[0]["params"]
    jump = torch.cat([(q.detach() - b).reshape(-1) for q, b in zip(params, base_point)])
    state = hidden.first_state()
    d, t, g = state.get("d"), state.get("t"), state.get("prev_flat_grad")
    if not torch.is_tensor(d) or g is None or not bool(jump.any()):  # no history yet, or nothing moved
        return
    if hidden.param_groups[0].get("line_search_fn") is None:
        # Without a line search nothing rejects a poor direction, and one from a history the zero pass has made
        # stale diverged (torch's own test problem, 15 draws of 100): LBFGS starts over, as at its first step.
        revival_step = state.get("spread_revival_step")
        state.clear()
        if revival_step is not None:
            state["spread_revival_step"] = revival_step
        return
    moved = float(g.dot(d)) <= -hidden.param_groups[0]["tolerance_change"]
    state["d"] = d.mul(float(t)).add_(jump) if moved else jump
    state["t"] = 1.0
    factors = {id(leaf) for k in kinds for _, _, leaf in k.factor_leaves()}
    held = torch.cat([(q.detach() == 0).reshape(-1) if id(q) in factors else torch.zeros(q.numel(), dtype=torch.bool, device=q.device)
                      for q in params])
    if not bool(held.any()):
        return
    keep = (~held).to(g.dtype)  # multiplying by a 0/1 vector is several times faster than masked_fill_ on CPU
    state["d"].mul_(keep)
    g.mul_(keep)  # the gradient there is 0 at the new point: y = 0 on held coordinates
    # in place: only LBFGS's history refers to its pairs (a copy per pair cost ~20% of a sparse-coding batch)
    pairs = [(y.mul_(keep), s.mul_(keep)) for y, s in zip(state["old_dirs"], state["old_stps"])]
    pairs = [(y, s, 1.0 / ys) for y, s in pairs for ys in [float(y.dot(s))] if ys > 1e-10]
    state["old_dirs"], state["old_stps"], state["ro"] = [y for y, _, _ in pairs], [s for _, s, _ in pairs], [r for _, _, r in pairs]
