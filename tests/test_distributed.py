"""spread under torch.distributed, on CPU with gloo: DDP, FSDP2 (fully_shard), DCP checkpoints, ZeRO.

Oracle: the single-process float64 run on the whole (concatenated) batch, computed here in the test
process with plain tensors. Two ranks are forked once for the module (one job runs every distributed
scenario, to keep process start-up off the 2-core budget); they save what they end with, and each test
compares that with the oracle. A 2-rank checkpoint is loaded into a single-process model (resharding).
"""

from __future__ import annotations

import datetime
import os
import socket
import traceback

import pytest
import torch
import torch.nn as nn

from spread_optim import SpreadAdam, SpreadOptimizer, sparsity_report

STEPS, SAVE_AT, BATCH, LOCAL_STEPS = 10, 5, 16, 4
TOL = 1e-10
FACTOR_KEYS = ("U", "u", "W")

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


class Net(nn.Module):
    """Two first layers sharing one factor per input feature, then row, column and element groups.
    Odd sizes: FSDP2 shards 7 rows as 4+3, 5 as 3+2, 3 as 2+1."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 7), nn.Linear(6, 7)
        self.c = nn.Linear(7, 5)
        self.d = nn.Linear(5, 4)
        self.e = nn.Linear(4, 3)
        self.double()
        with torch.no_grad():  # feature 0 starts exactly at zero (on the saddle), feature 1 almost
            for layer in (self.a, self.b):
                layer.weight[:, 0] = 0
                layer.weight[:, 1] *= 1e-3
            self.d.weight[:, 0] = 0

    def forward(self, x):
        h = torch.tanh(self.a(x)) + torch.tanh(self.b(x))
        return self.e(torch.tanh(self.d(torch.tanh(self.c(h)))))


class OwnAdam(torch.optim.Adam):
    """A user's base class (defined outside torch.optim)."""


def param_groups(m, shared=True):
    if shared == "local":  # element and row groups only: nothing spans FSDP2's dim-0 shards
        return [
            {"params": [m.b.weight, m.c.weight], "kappa": 0.08, "sparsity": "row"},
            {"params": [m.e.weight, m.e.bias], "kappa": 0.04},
            {"params": [m.a.weight, m.a.bias, m.b.bias, m.c.bias, m.d.weight, m.d.bias]},
        ]
    groups = [
        {"params": [m.c.weight], "kappa": 0.08, "sparsity": "row"},
        {"params": [m.d.weight], "kappa": 0.12, "sparsity": "column"},
        {"params": [m.e.weight], "kappa": 0.04},
        {"params": [m.c.bias, m.d.bias, m.e.bias]},
    ]
    if shared:
        groups.append({"params": [m.a.weight, m.b.weight], "kappa": 0.2, "sparsity": "column", "share_groups": True})
        groups[-2]["params"] += [m.a.bias, m.b.bias]
    else:
        groups.append({"params": [m.a.weight], "kappa": 0.2, "sparsity": "column"})
        groups.append({"params": [m.b.weight], "kappa": 0.2, "sparsity": "row"})
        groups[3]["params"] += [m.a.bias, m.b.bias]
    return groups


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 6, generator=g, dtype=torch.float64), torch.randn(BATCH, 3, generator=g, dtype=torch.float64)


def loss_fn(m, x, y):
    return ((m(x) - y) ** 2).mean()


def snapshot(m, opt, full=lambda t: t):
    """Parameters and factors by parameter name (``full`` gathers DTensors)."""
    out = {}
    for name, p in m.named_parameters():
        name = name.replace("module.", "")
        out[name] = full(p.detach()).clone()
        for k in FACTOR_KEYS:
            if k in opt.state[p]:
                out[f"{name}.{k}"] = full(opt.state[p][k].detach()).clone()
    return out


def base_state(m, opt, full):
    """The base optimizer's state of every factor (Adam's moments and step counts)."""
    return {f"{name}.{key}.{k}": full(v).clone() for name, p in m.named_parameters()
            for key, st in opt.state[p].get("base", {}).items() for k, v in st.items() if isinstance(v, torch.Tensor)}


def drop_grads(m, step):
    """Gradless parameters: b.weight (shares its factor with a.weight) always, d.weight (a column group
    of its own) every third step."""
    m.b.weight.grad = None
    if step % 3 == 0:
        m.d.weight.grad = None


def reference(steps, shared=True, gradless=False):
    """The single-process run on the whole batch: (snapshot, kkt residual, report rows) after each step."""
    m = Net()
    opt = SpreadAdam(param_groups(m, shared), lr=0.1)
    x, y = data()
    history = []
    for i in range(steps):
        opt.zero_grad()
        loss_fn(m, x, y).backward()
        if gradless:
            drop_grads(m, i)
        opt.step()
        history.append(snapshot(m, opt))
    opt.zero_grad()
    loss_fn(m, x, y).backward()
    return m, opt, history, opt.kkt_residual(), sparsity_report(m, opt).to_dicts(), opt.penalty()


# ----------------------------------------------------------------------------------------------------
# the distributed job (forked ranks)


def _counted_step(opt, closure=None, only=None):
    """The number of collectives in one step (``only``: those whose name has it, e.g. all_reduce, not
    FSDP2's own gathers in a closure's forward and backward)."""
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as comm:
        opt.step(closure)
    if only is None:
        return comm.get_total_counts()
    return sum(n for op, n in comm.get_comm_counts().items() if only in str(op).replace("allreduce", "all_reduce"))


def _fsdp_model():
    from torch.distributed.fsdp import fully_shard

    m = Net()
    for layer in (m.a, m.b, m.c, m.d, m.e):
        fully_shard(layer)
    fully_shard(m)
    return m


def _job(rank, world, port, out, ckpt):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    x, y = data()
    n = BATCH // world
    x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
    result = {}
    try:
        # DDP
        ddp = DDP(Net())
        opt = SpreadAdam(param_groups(ddp.module), lr=0.1)
        comms = []
        for _ in range(STEPS):
            opt.zero_grad()
            loss_fn(ddp, x, y).backward()
            comms.append(_counted_step(opt))
        result["ddp"] = snapshot(ddp.module, opt)
        result["ddp_comms"] = comms

        # FSDP2, with a DCP checkpoint after SAVE_AT steps
        full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t
        m = _fsdp_model()
        opt = SpreadAdam(param_groups(m), lr=0.1)
        comms, history = [], []
        for i in range(STEPS):
            opt.zero_grad()
            loss_fn(m, x, y).backward()
            comms.append(_counted_step(opt))
            history.append(snapshot(m, opt, full))
            if i + 1 == SAVE_AT:
                msd, osd = get_state_dict(m, opt)
                dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
        # a non-finite gradient in one rank's shard only: every rank raises, nothing moves
        opt.zero_grad()
        loss_fn(m, x, y).backward()
        if rank == 1:
            m.d.weight.grad.to_local()[0, 0] = float("nan")
        before = {**snapshot(m, opt, full), **base_state(m, opt, full)}
        try:
            opt.step()
            result["nan_error"] = None
        except FloatingPointError as err:
            result["nan_error"] = str(err)
        after = {**snapshot(m, opt, full), **base_state(m, opt, full)}
        result["nan_unchanged"] = all(torch.equal(before[k], after[k]) for k in before)

        opt.zero_grad()
        loss_fn(m, x, y).backward()
        result.update(fsdp=history, fsdp_comms=comms, fsdp_kkt=opt.kkt_residual(), fsdp_penalty=opt.penalty(),
                      fsdp_report=sparsity_report(m, opt).to_dicts(),
                      fsdp_local_shape=tuple(opt.state[m.c.weight]["W"].to_local().shape))

        # step(closure): the same run
        m2 = _fsdp_model()
        opt2 = SpreadAdam(param_groups(m2), lr=0.1)
        closure_comms = []
        for _ in range(STEPS):
            def closure():
                opt2.zero_grad()
                loss = loss_fn(m2, x, y)
                loss.backward()
                return loss
            closure_comms.append(_counted_step(opt2, closure, "all_reduce"))
        result.update(fsdp_closure=snapshot(m2, opt2, full), fsdp_closure_comms=closure_comms)

        # parameters without a gradient: their factors stay, the others' exact-zero pass is unchanged
        m2 = _fsdp_model()
        opt2 = SpreadAdam(param_groups(m2), lr=0.1)
        for i in range(LOCAL_STEPS):
            opt2.zero_grad()
            loss_fn(m2, x, y).backward()
            drop_grads(m2, i)
            opt2.step()
        result["fsdp_gradless"] = snapshot(m2, opt2, full)

        # weights written outside the optimizer, on one rank's shard of groups that span shards (columns of
        # d.weight, the shared columns of a.weight and b.weight): adopted on every rank, nothing lost
        m2 = _fsdp_model()
        opt2 = SpreadAdam(param_groups(m2), lr=0.1)
        for _ in range(2):
            opt2.zero_grad()
            loss_fn(m2, x, y).backward()
            opt2.step()
        if rank == 0:
            with torch.no_grad():
                m2.d.weight.to_local()[0].zero_()
                m2.a.weight.to_local()[0, 2] = 0.5
        written = {name: full(p.detach()).clone() for name, p in m2.named_parameters()}
        for group in opt2.param_groups:
            group["lr"] = 0.0
        adopt_comms = []
        for _ in range(2):
            opt2.zero_grad()
            loss_fn(m2, x, y).backward()
            adopt_comms.append(_counted_step(opt2, only="all_reduce"))
        result.update(fsdp_adopt_written=written, fsdp_adopt_after=snapshot(m2, opt2, full), fsdp_adopt_comms=adopt_comms)

        # a base from outside torch.optim (no promise that it steps two subsets as it steps the whole):
        # the two-round path, same numbers
        m2 = _fsdp_model()
        opt2 = SpreadOptimizer(param_groups(m2), OwnAdam, lr=0.1)
        own_comms = []
        for _ in range(LOCAL_STEPS):
            opt2.zero_grad()
            loss_fn(m2, x, y).backward()
            own_comms.append(_counted_step(opt2))
        result.update(fsdp_own_base=snapshot(m2, opt2, full), fsdp_own_base_comms=own_comms)

        # layouts spread refuses, with the param group named
        from torch.distributed.tensor import Shard, distribute_tensor

        errors = []
        plain = nn.Parameter(torch.ones(7, 6, dtype=torch.float64))
        column_sharded = nn.Parameter(distribute_tensor(torch.ones(4, 6, dtype=torch.float64), m2.a.weight.device_mesh, [Shard(1)]))
        for groups in ([{"params": [m2.a.weight, plain], "sparsity": "column", "share_groups": True}],
                       [{"params": [column_sharded]}]):
            bad = SpreadAdam(groups, lr=0.1, kappa=0.1)
            for p in groups[0]["params"]:
                p.grad = torch.zeros_like(p)
            try:
                bad.step()
                errors.append(None)
            except ValueError as err:
                errors.append(str(err))
        result["layout_errors"] = errors

        # LBFGS on sharded parameters: refused when the optimizer is built, with the group named (its line search
        # and the exact-zero pass's backtracking would have to agree across ranks; before, the ranks hung)
        try:
            SpreadOptimizer(param_groups(m2), torch.optim.LBFGS, lr=0.1)
            result["lbfgs_error"] = None
        except ValueError as err:
            result["lbfgs_error"] = str(err)

        # element and row groups only: shard-local, one all-reduce per step (the gradient check)
        m2 = _fsdp_model()
        opt2 = SpreadAdam(param_groups(m2, "local"), lr=0.1)
        local_comms = []
        for _ in range(LOCAL_STEPS):
            opt2.zero_grad()
            loss_fn(m2, x, y).backward()
            local_comms.append(_counted_step(opt2))
        opt2.zero_grad()
        loss_fn(m2, x, y).backward()
        result.update(fsdp_local_comms=local_comms, fsdp_local=snapshot(m2, opt2, full), fsdp_local_kkt=opt2.kkt_residual(),
                      fsdp_local_report=sparsity_report(m2, opt2).to_dicts())

        # resume from the checkpoint on a fresh model and optimizer
        m = _fsdp_model()
        opt = SpreadAdam(param_groups(m), lr=0.1)
        msd, osd = get_state_dict(m, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=ckpt)
        set_state_dict(m, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        resumed = []
        for _ in range(SAVE_AT, STEPS):
            opt.zero_grad()
            loss_fn(m, x, y).backward()
            opt.step()
            resumed.append(snapshot(m, opt, full))
        result["fsdp_resumed"] = resumed

        # ZeRO: per-parameter groups work, share_groups is refused
        ddp = DDP(Net())
        zero = ZeroRedundancyOptimizer(param_groups(ddp.module, shared=False), optimizer_class=SpreadAdam, lr=0.1)
        for _ in range(STEPS):
            zero.zero_grad()
            loss_fn(ddp, x, y).backward()
            zero.step()
        result["zero"] = {name.replace("module.", ""): p.detach().clone() for name, p in ddp.named_parameters()}
        try:
            ZeroRedundancyOptimizer(param_groups(Net()), optimizer_class=SpreadAdam, lr=0.1)
            result["zero_shared_error"] = None
        except ValueError as err:
            result["zero_shared_error"] = str(err)
    except Exception:
        result["error"] = traceback.format_exc()
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        raise
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    ckpt = str(out / "ckpt")
    torch.multiprocessing.start_processes(_job, args=(2, _free_port(), str(out), ckpt), nprocs=2, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)], ckpt


@pytest.fixture(scope="module")
def ref():
    return reference(STEPS)


def assert_close(got, want, what):
    assert got.keys() == want.keys(), what
    for k in want:
        assert got[k].shape == want[k].shape, f"{what}: {k}"
        err = (got[k] - want[k]).abs().max().item() if want[k].numel() else 0.0
        assert err <= TOL, f"{what}: {k} differs from the single-process run by {err:.3g}"


# ----------------------------------------------------------------------------------------------------
# tests


def test_reference_exercises_exact_zeros(ref):
    """The oracle run must reach exact zeros, else the comparisons below would not test them."""
    report = {r["name"]: r for r in ref[4]}
    assert report["d.weight"]["zero_groups"] > 0 and report["e.weight"]["zeros"] > 0
    assert report["a.weight"]["zero_groups"] > 0 and report["c.weight"]["zero_groups"] > 0


def test_ddp_equals_single_process(ranks, ref):
    results, _ = ranks
    for rank, r in enumerate(results):
        assert_close(r["ddp"], ref[2][-1], f"DDP rank {rank}")
        assert r["ddp_comms"] == [0] * STEPS, "spread must add no collective under DDP"


def test_fsdp2_equals_single_process(ranks, ref):
    results, _ = ranks
    for rank, r in enumerate(results):
        for step, (got, want) in enumerate(zip(r["fsdp"], ref[2])):
            assert_close(got, want, f"FSDP2 rank {rank} step {step + 1}")
        assert r["fsdp_local_shape"] == [(3, 7), (2, 7)][rank]  # the factors are sharded like the parameter
        assert_close(r["fsdp_closure"], ref[2][-1], f"FSDP2 step(closure) rank {rank}")
        assert r["fsdp_closure_comms"][1:] == [1] * (STEPS - 1)  # the closure's loss, then a one-round step


def test_fsdp2_collectives_are_batched(ranks):
    """One all-reduce per step (flags, pre-step sums, finish sums), whatever the number of groups;
    the first step also splits the spanning groups' factors by their global norms (two per shared set)."""
    results, _ = ranks
    for r in results:
        assert r["fsdp_comms"][1:] == [1] * (STEPS - 1)
        assert r["fsdp_comms"][0] == 1 + 2 * 2
        assert r["fsdp_local_comms"] == [1] * LOCAL_STEPS  # element and row groups: no sums across shards


def test_fsdp2_gradless_parameters(ranks):
    """Some parameters without a gradient (one member of a shared set, a whole column group): equal to
    the single-process run with the same gradients missing."""
    results, _ = ranks
    want = reference(LOCAL_STEPS, gradless=True)[2][-1]
    for rank, r in enumerate(results):
        assert_close(r["fsdp_gradless"], want, f"FSDP2 gradless rank {rank}")


def test_fsdp2_other_bases_take_two_rounds(ranks, ref):
    """A base outside torch.optim: two all-reduces per step (before and after the base step), same run."""
    results, _ = ranks
    for rank, r in enumerate(results):
        assert r["fsdp_own_base_comms"] == [2 + 2 * 2] + [2] * (LOCAL_STEPS - 1)
        assert_close(r["fsdp_own_base"], ref[2][LOCAL_STEPS - 1], f"FSDP2 own base rank {rank}")


def test_fsdp2_kkt_penalty_and_report_are_global(ranks, ref):
    results, _ = ranks
    for r in results:
        assert abs(r["fsdp_kkt"] - ref[3]) <= TOL
        assert abs(r["fsdp_penalty"] - ref[5]) <= TOL
        assert r["fsdp_report"] == ref[4]


def test_fsdp2_unsupported_layouts_are_refused(ranks):
    results, _ = ranks
    for r in results:
        shared, placement = r["layout_errors"]
        assert shared is not None and "param group 0" in shared and "share_groups" in shared
        assert placement is not None and "param group 0" in placement and "Shard(dim=1)" in placement


def test_fsdp2_outside_writes_on_one_shard_are_adopted(ranks):
    """A write to one rank's shard of column groups: every rank adopts it (the step then takes extra rounds), the
    weights stay as written, the factors reproduce them, and the next step is back to one all-reduce."""
    results, _ = ranks
    for r in results:
        written, after = r["fsdp_adopt_written"], r["fsdp_adopt_after"]
        for name, value in written.items():
            assert torch.equal(after[name], value), name
        assert torch.equal(after["d.weight.u"][None, :] * after["d.weight.W"], written["d.weight"])
        assert r["fsdp_adopt_comms"][0] > 1 and r["fsdp_adopt_comms"][1] == 1, r["fsdp_adopt_comms"]


def test_fsdp2_lbfgs_is_refused_at_construction(ranks):
    results, _ = ranks
    for r in results:
        assert r["lbfgs_error"] is not None and "LBFGS" in r["lbfgs_error"] and "param group 0" in r["lbfgs_error"]


def test_fsdp2_nonfinite_gradient_on_one_shard(ranks):
    """A NaN in one rank's gradient shard: every rank raises (same answer everywhere), nothing moves:
    neither the parameters and factors nor the base's state (the step moves spanning groups' W before
    its all-reduce, and must undo that)."""
    results, _ = ranks
    for r in results:
        assert r["nan_error"] is not None and "parameter of shape (4, 5)" in r["nan_error"]
        assert r["nan_unchanged"]


def test_fsdp2_element_and_row_groups(ranks):
    """Shard-local groups only: equal to the single-process run, and the KKT residual (an element-wise
    maximum over shards) and the report are global."""
    results, _ = ranks
    _, _, history, kkt, report, _ = reference(LOCAL_STEPS, "local")
    for rank, r in enumerate(results):
        assert_close(r["fsdp_local"], history[-1], f"FSDP2 element/row rank {rank}")
        assert abs(r["fsdp_local_kkt"] - kkt) <= TOL
        assert r["fsdp_local_report"] == report


def test_dcp_resume_is_exact(ranks):
    results, _ = ranks
    for rank, r in enumerate(results):
        for got, want in zip(r["fsdp_resumed"], r["fsdp"][SAVE_AT:]):
            assert got.keys() == want.keys()
            for k in want:
                assert torch.equal(got[k], want[k]), f"rank {rank}: {k} after resuming differs"


def test_reshard_two_ranks_to_one(ranks, ref):
    """The 2-rank FSDP2 checkpoint loads into a plain single-process model and optimizer, and the run
    continues as the single-process run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    _, ckpt = ranks
    m = Net()
    opt = SpreadAdam(param_groups(m), lr=0.1)
    msd, osd = get_state_dict(m, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=ckpt, no_dist=True)
    set_state_dict(m, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert_close(snapshot(m, opt), ref[2][SAVE_AT - 1], "loaded on one rank")
    x, y = data()
    for _ in range(SAVE_AT, STEPS):
        opt.zero_grad()
        loss_fn(m, x, y).backward()
        opt.step()
    assert_close(snapshot(m, opt), ref[2][-1], "resharded run")


def test_zero_redundancy_optimizer(ranks):
    """ZeRO keeps each parameter's factors on its owner: equal to the single-process run; a shared
    group (its members may go to different ranks) is refused, naming FSDP2."""
    results, _ = ranks
    want = {name: p.detach() for name, p in reference(STEPS, shared=False)[0].named_parameters()}
    for rank, r in enumerate(results):
        assert_close(r["zero"], want, f"ZeRO rank {rank}")
        assert r["zero_shared_error"] is not None and "share_groups" in r["zero_shared_error"]
        assert "fully_shard" in r["zero_shared_error"]
