"""The native CPU loop (kernels/native.py, native_step.c) against the spec's step of one tensor.

Oracles: the spec's ``compiled.element_step`` run eagerly (the definition, composed of kernels/reference.py) and
the same function compiled by inductor. The native loop and inductor both use IEEE square roots and divisions on
the same values in the same order: they agree bit for bit. Eager PyTorch's vectorised float32 square root may
differ from the IEEE one by an ulp (seen on revived entries), which a cancelling Adam update can raise to a few
1e-6 relative: against the eager spec the tensors agree to that, and the exact zeros exactly.
"""

import itertools
import platform
from pathlib import Path

import pytest
import torch

from spread_optim import SpreadAdam, SpreadSGD
from spread_optim.kernels import compiled, dispatch, native

pytestmark = pytest.mark.skipif(native.unavailable() is not None, reason=f"native step unavailable: {native.unavailable()}")

HYPER = dict(kappa=2e-3, lr=1e-2, zero_threshold=1e-6, step_size_0=0.02, bc2_sqrt_0=0.3, step_size_1=0.03,
             bc2_sqrt_1=0.4, beta1=0.9, beta2=0.99, eps=1e-8, momentum=0.8, dampening=0.1, grad_scale=4.0)


def _problem(n: int, dtype: torch.dtype, rule: str, amsgrad: bool, momentum: bool, first: bool, scale: float, seed: int = 0):
    """Tensors of one step: live, dead (U = W = 0) and sign-crossing entries, and a few weights written outside."""
    gen = torch.Generator().manual_seed(seed)
    U = torch.randn(n, generator=gen, dtype=dtype)
    W = torch.randn(n, generator=gen, dtype=dtype)
    U[: n // 5] = 0
    W[: n // 5] = 0  # dead entries, some revived (|g| > 2 kappa), some held
    U[n // 5: n // 4] *= 1e-3  # small entries: snapped or crossing zero
    g = torch.randn(n, generator=gen, dtype=dtype) * 4e-3 * scale  # (divided by the grad scale in the step)
    p = U * W
    p[-7:] += 1.0  # written outside the optimizer: left as they are, counted
    p[-3:] = 0.0
    if rule == "adam":
        states = [[torch.randn(n, generator=gen, dtype=dtype) * 1e-2, torch.rand(n, generator=gen, dtype=dtype) * 1e-4,
                   torch.rand(n, generator=gen, dtype=dtype) * 1e-4 if amsgrad else None] for _ in range(2)]
    elif momentum:
        states = [[torch.randn(n, generator=gen, dtype=dtype) * 1e-2 if not first else torch.full((n,), float("nan"), dtype=dtype)]
                  for _ in range(2)]
    else:
        states = [[None], [None]]
    return [g, p, U, W, states[0], states[1]]


def _clone(args):
    return [[s.clone() if s is not None else None for s in a] if isinstance(a, list) else a.clone() for a in args]


def _tensors(args):
    g, p, U, W, sU, sW = args
    return [p, U, W, *[s for s in sU if s is not None], *[s for s in sW if s is not None]]


COMBOS = [dict(rule="adam", amsgrad=a, scaled=s, maximize=m) for a, s, m in itertools.product([False, True], [False, True], [False, True])]
COMBOS += [dict(rule="sgd", momentum=mo, nesterov=ne, first=fi, scaled=s, maximize=m)
           for mo, ne, fi, s, m in itertools.product([False, True], [False, True], [False, True], [False, True], [False, True])
           if mo or not (ne or fi)]


INDUCTOR = [dict(rule="adam", amsgrad=True, scaled=True, maximize=True),
            dict(rule="sgd", momentum=True, nesterov=True, first=True, scaled=False, maximize=False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("flags", COMBOS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_native_step_equals_the_spec(flags, dtype):
    full = dict(rule="adam", amsgrad=False, nesterov=False, momentum=False, first=False, maximize=False, scaled=False,
                scheme="balanced") | flags
    args = _problem(4099, dtype, full["rule"], full["amsgrad"], full["momentum"], full["first"],
                    HYPER["grad_scale"] if full["scaled"] else 1.0)  # (4099: a ragged tail)
    values = list(HYPER.values())
    mine, spec, inductor = args, _clone(args), _clone(args)
    hyper = torch.tensor(values, dtype=torch.float64)
    left = native.element_step(*mine, values, **full)
    assert left == 7 == int(compiled.element_step(*spec, hyper, **full))  # the written weights, counted alike
    if flags in INDUCTOR:  # (each combination compiles for seconds: a few of them)
        assert int(compiled.compiled("element", **full)(*inductor, hyper)) == 7
        for a, c in zip(_tensors(mine), _tensors(inductor)):
            assert torch.equal(a.nan_to_num(7.0), c.nan_to_num(7.0)), "the native loop and the compiled spec differ"
    for a, b in zip(_tensors(mine), _tensors(spec)):
        torch.testing.assert_close(a, b, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-8 if dtype == torch.float32 else 1e-15,
                                   equal_nan=True)  # (NaN: a first momentum buffer where an entry was left alone)
        assert torch.equal(a == 0, b == 0), "exact zeros differ from the spec's"
    assert torch.equal(mine[1][-7:], args[1][-7:]) and torch.equal(mine[1][-7:], spec[1][-7:])  # written weights kept
    revived = (args[2][: 4099 // 5] != 0).sum()  # (mine[2] is args[2], moved in place)
    assert 0 < revived < 4099 // 5, "the problem revives some dead entries and holds others"


def test_nonfinite_entries_propagate_as_in_the_spec():
    """A NaN in a state (a corrupted checkpoint) flows through the step the same way as through the spec's."""
    args = _problem(64, torch.float32, "adam", False, False, False, 1.0)
    args[4][1][3] = float("nan")
    spec = _clone(args)
    values = list(HYPER.values())
    native.element_step(*args, values, rule="adam")
    compiled.element_step(*spec, torch.tensor(values, dtype=torch.float64), rule="adam")
    for a, b in zip(_tensors(args), _tensors(spec)):
        torch.testing.assert_close(a, b, rtol=4e-7, atol=0, equal_nan=True)


def _default_and_split(make, X, y, outputs: int, steps: int) -> list[tuple]:
    """``(paths, weight)`` after ``steps`` steps of a bias-free Linear on ``(X, y)`` with ``fused=None``, then the same
    with ``fused=False`` (the split path: torch's own base on the factors and the spec's zero pass)."""
    runs = []
    for fused in (None, False):
        lin = torch.nn.Linear(X.shape[1], outputs, bias=False)
        lin.weight.data = torch.linspace(-1, 1, outputs * X.shape[1]).reshape(outputs, X.shape[1])
        opt = make([lin.weight])
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(lin(X), y).backward()
            opt.param_groups[0]["fused"] = fused
            opt.step()
        runs.append((opt._paths, lin.weight.detach().clone()))
    assert runs[0][0] == ["compiled"] and runs[1][0] == ["cpu"]
    return runs


@pytest.mark.parametrize("make", [lambda ps: SpreadAdam(ps, lr=1e-2, kappa=1e-3, amsgrad=True),
                                  lambda ps: SpreadSGD(ps, lr=1e-1, kappa=1e-3, momentum=0.9, nesterov=True)])
def test_default_cpu_path_of_element_groups_is_the_native_loop(make):
    """fused=None on CPU: small element-sparse float32 groups take the compiled step's native loop, and their
    trajectory is the split path's."""
    torch.manual_seed(0)
    X, y = torch.randn(64, 12), torch.randn(64, 1)
    (_, native_run), (_, split_run) = _default_and_split(make, X, y, 1, 30)
    torch.testing.assert_close(native_run, split_run, rtol=1e-5, atol=1e-6)
    assert torch.equal(native_run == 0, split_run == 0)


@pytest.mark.parametrize("make", [lambda ps: SpreadAdam(ps, lr=3e-2, kappa=5e-2, sparsity="column"),
                                  lambda ps: SpreadSGD(ps, lr=5e-2, momentum=0.9, kappa=2e-2, sparsity="column")])
def test_default_cpu_path_of_column_groups_is_the_native_loop(make):
    """fused=None on CPU: a column-sparse float32 group takes the native columns loop, and its trajectory is the
    split path's: the same weights to rounding and the same zero columns (input features dropped)."""
    torch.manual_seed(0)
    X = torch.randn(128, 12)
    y = X[:, :3] @ torch.randn(3, 2)  # (only the first three features matter: the others' columns go to zero)
    (_, native_run), (_, split_run) = _default_and_split(make, X, y, 2, 150)
    torch.testing.assert_close(native_run, split_run, rtol=1e-4, atol=1e-6)
    zero = (native_run == 0).all(dim=0)
    assert torch.equal(zero, (split_run == 0).all(dim=0)) and 0 < int(zero.sum()) < 12, "some, not all, columns at zero"


def test_without_a_compiler_the_inductor_engine_runs(monkeypatch, tmp_path):
    """No C compiler: unavailable() says so, and the dispatch falls back to inductor for the compiled step and to
    the split path for small groups (fused=None)."""
    monkeypatch.setattr(native, "_compiler", lambda: None)
    native._library.cache_clear()
    try:
        assert "no C compiler" in native.unavailable()
        p = torch.nn.Parameter(torch.randn(8, 8))
        assert dispatch.cpu_engine("element", p, p, p, {"rule": "adam"}) == "inductor"
        p.grad = torch.randn(8, 8)
        opt = SpreadAdam([p], lr=1e-2, kappa=1e-3)
        opt.step()
        assert opt._paths == ["cpu"]
    finally:
        native._library.cache_clear()


def test_the_library_is_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPREAD_OPTIM_CACHE", str(tmp_path))
    native._library.cache_clear()
    try:
        assert native.unavailable() is None
        built = list(tmp_path.glob("native_step_*.so"))
        assert len(built) == 1
        native._library.cache_clear()
        assert native.unavailable() is None and list(tmp_path.glob("native_step_*.so")) == built
    finally:
        native._library.cache_clear()


def test_the_library_is_built_per_cpu(monkeypatch, tmp_path):
    """``-march=native`` binds the library to the CPU it was built on: a cache folder shared by machines of
    different CPUs (a cluster's home folder) holds one library per CPU, the key is stable from call to call, and the
    CPU is read off the compiler driver (gcc's expanded ``-m`` options, clang's target CPU and features)."""
    cc = native._compiler()
    assert native._build_key(cc) == native._build_key(cc), "the same machine, the same library"
    assert native._target(cc).split()[0] == platform.machine() and len(native._target(cc).split()) > 1
    for name, text in (("gcc", 'cc1 -quiet /dev/null "-march=znver4" -mmmx -mno-sse4a -mavx512f --param "l1-cache-size=48"'),
                       ("clang", '"clang" "-cc1" "-E" "-target-cpu" "sapphirerapids" "-target-feature" "+avx512f" "-x" "c"')):
        fake = tmp_path / name
        fake.write_text(f"#!/bin/sh\necho '{text}' >&2\n")
        fake.chmod(0o755)
        expected = {"gcc": "-march=znver4 -mmmx -mno-sse4a -mavx512f", "clang": "sapphirerapids +avx512f"}[name]
        assert native._target(str(fake)) == f"{platform.machine()} {expected}"
    keys = {}
    for cpu in ("one cpu", "another cpu", "one cpu"):
        monkeypatch.setattr(native, "_target", lambda cc, cpu=cpu: cpu)
        keys.setdefault(cpu, set()).add(native._build_key(cc))
    assert len(keys["one cpu"]) == 1 and keys["one cpu"] != keys["another cpu"]
    keys = {cpu: key for cpu, (key,) in keys.items()}
    # the library looked up is the one named by this CPU's key: a copy of this machine's library under "one cpu"'s
    # name is loaded as it is (nothing is built: the folder keeps one file)
    cache = tmp_path / "cache"
    cache.mkdir()
    built = Path(native._library()._name)
    (cache / f"native_step_{keys['one cpu']}.so").write_bytes(built.read_bytes())
    monkeypatch.setenv("SPREAD_OPTIM_CACHE", str(cache))
    monkeypatch.setattr(native, "_target", lambda cc: "one cpu")
    native._library.cache_clear()
    try:
        assert native.unavailable() is None and len(list(cache.iterdir())) == 1
        assert Path(native._library()._name).name == f"native_step_{keys['one cpu']}.so"
    finally:
        native._library.cache_clear()


def _rows_problem(rows: int, width: int, dtype: torch.dtype, rule: str, amsgrad: bool, momentum: bool, scale: float):
    """One row-sparse step: live rows, dead rows (u = 0, W = 0; some revived), small rows, and rows with a weight
    written outside the optimizer."""
    gen = torch.Generator().manual_seed(1)
    u = torch.rand(rows, generator=gen, dtype=dtype) + 0.5
    W = torch.randn(rows, width, generator=gen, dtype=dtype)
    u[: rows // 4] = 0
    W[: rows // 4] = 0
    W[rows // 4: rows // 3] *= 1e-4
    g = torch.randn(rows, width, generator=gen, dtype=dtype) * (4.1e-3 / width**0.5) * scale  # norms near 2 kappa
    p = u[:, None] * W
    p[-3:, -1] += 1.0
    return [g, p, u, W, _states(rows, gen, dtype, rule, amsgrad, momentum), _states((rows, width), gen, dtype, rule, amsgrad, momentum)]


def _states(shape, gen, dtype, rule: str, amsgrad: bool, momentum: bool) -> list:
    """A factor's base state: Adam's three (the third with AMSGrad), SGD's momentum buffer, or none."""
    if rule == "adam":
        return [torch.randn(shape, generator=gen, dtype=dtype) * 1e-2, torch.rand(shape, generator=gen, dtype=dtype) * 1e-4,
                torch.rand(shape, generator=gen, dtype=dtype) * 1e-4 if amsgrad else None]
    return [torch.randn(shape, generator=gen, dtype=dtype) * 1e-2] if momentum else [None]


def _columns_problem(rows: int, columns: int, r: int, dtype: torch.dtype, rule: str, amsgrad: bool, momentum: bool, scale: float,
                     maximize: bool = False, dead: bool = True):
    """One column-sparse step on ``(rows, columns, r)`` tensors: live columns, dead columns (u = 0, W = 0; some
    revived; ``dead=False``: none, the kernel's other sweeps), small columns (some snap), and columns with a weight
    written outside the optimizer."""
    gen = torch.Generator().manual_seed(2)
    u = torch.rand(columns, generator=gen, dtype=dtype) + 0.5
    W = torch.randn(rows, columns, r, generator=gen, dtype=dtype)
    if dead:
        u[: columns // 4] = 0
        W[:, : columns // 4] = 0
    W[:, columns // 4: columns // 3] *= 1e-4
    g = torch.randn(rows, columns, r, generator=gen, dtype=dtype) * (4.1e-3 / (rows * r) ** 0.5) * scale
    small = slice(columns // 4, columns // 3)
    g[:, small] = W[:, small].sign() * 0.1 * scale * (-1 if maximize else 1)  # (the step crosses zero: they snap)
    tiny = slice(columns // 3, columns // 3 + 2)  # (theta under the threshold without crossing: the settled test)
    u[tiny], g[:, tiny] = 1e-9, 0.0
    p = u[None, :, None] * W
    p[-1, -3:, -1] += 1.0
    return [g, p, u, W, _states(columns, gen, dtype, rule, amsgrad, momentum),
            _states((rows, columns, r), gen, dtype, rule, amsgrad, momentum)]


ROW_COMBOS = [dict(rule="adam", amsgrad=False), dict(rule="adam", amsgrad=True, scaled=True, maximize=True),
              dict(rule="sgd"), dict(rule="sgd", momentum=True, nesterov=True), dict(rule="sgd", momentum=True, first=True, scaled=True)]


@pytest.mark.parametrize("width", [1, 37, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("flags", ROW_COMBOS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_native_rows_step_equals_the_spec(flags, dtype, width):
    full = _full(flags)
    args = _rows_problem(48, width, dtype, full["rule"], full["amsgrad"], full["momentum"], HYPER["grad_scale"] if full["scaled"] else 1.0)
    before = _step_against_the_spec(native.rows_step, "row", args, full, dtype)
    for a, b in zip(_tensors(args), _tensors(before)):  # rows with a written weight: left exactly as they were
        assert torch.equal(a[-3:].nan_to_num(7.0), b[-3:].nan_to_num(7.0))
    u = args[2]
    assert 0 < int((u[: 48 // 4] != 0).sum()) < 48 // 4, "the problem revives some dead rows and holds others"


def _full(flags: dict) -> dict:
    return dict(rule="adam", amsgrad=False, nesterov=False, momentum=False, first=False, maximize=False, scaled=False,
                scheme="balanced") | flags


def _step_against_the_spec(step, groups: str, args: list, full: dict, dtype, **hyper) -> list:
    """One native group step of ``args`` (in place) against the spec's on a copy: the same tensors to rounding, the
    same exact and signed zeros, three groups left for adoption; returns the tensors as they were. ``hyper``
    overrides :data:`HYPER`."""
    if full["first"]:
        args[4][0].fill_(float("nan")), args[5][0].fill_(float("nan"))  # a fresh (empty) momentum buffer
    before = _clone(args)
    values = list((HYPER | hyper).values())
    spec = _clone(args)
    left = step(*args, values, **full)
    assert left == 3 == int(compiled.grouped_step(*spec, torch.tensor(values, dtype=torch.float64), None, groups=groups, **full))
    tol = dict(rtol=1e-5, atol=1e-8) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-15)
    for a, b in zip(_tensors(args), _tensors(spec)):
        torch.testing.assert_close(a, b, **tol, equal_nan=True)
        assert torch.equal(a == 0, b == 0), "exact zeros differ from the spec's"
        assert torch.equal(a.signbit(), b.signbit()), "signed zeros differ from the spec's"
    return before


@pytest.mark.parametrize("dead", [True, False], ids=["dead", "no-dead"])
@pytest.mark.parametrize("shape", [(5, 48, 1), (7, 40, 9), (1, 36, 3), (5, 1100, 1), (4, 130, 9), (1, 1100, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("flags", ROW_COMBOS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_native_columns_step_equals_the_spec(flags, dtype, shape, dead):
    """The columns kernel against the spec's column step: Linear-like (r = 1), conv-like (r = 9) and one-row
    tensors, rows over 4 KB (taken two at once; an odd count leaves one alone); dead columns held and revived (or
    none: the sweeps without a dead group's terms), small ones snapped, written ones left exactly as they were."""
    full = _full(flags)
    rows, columns, r = shape
    args = _columns_problem(rows, columns, r, dtype, full["rule"], full["amsgrad"], full["momentum"],
                            HYPER["grad_scale"] if full["scaled"] else 1.0, full["maximize"], dead)
    before = _step_against_the_spec(native.columns_step, "column", args, full, dtype)
    for a, b in zip(_tensors(args), _tensors(before)):  # columns with a written weight: left exactly as they were
        written = (slice(None), slice(-3, None)) if a.dim() == 3 else slice(-3, None)
        assert torch.equal(a[written].nan_to_num(7.0), b[written].nan_to_num(7.0))
    u = args[2]
    share = (0.5 if rows == 1 else 0.9) if columns > 1000 else 1.0  # (the wide problems' random columns: most, not all)
    if dead:
        assert 0 < int((u[: columns // 4] != 0).sum()) < columns // 4, "the problem revives some dead columns and holds others"
    else:
        assert float((u[: columns // 4] != 0).double().mean()) >= share
    snapped, live = u[columns // 4: columns // 3] == 0, u[columns // 3 + 2: -3] != 0
    if full["rule"] == "sgd" and not full["momentum"]:
        assert bool((u[columns // 3: columns // 3 + 2] == 0).all()), "tiny settled columns snap"
    assert float(snapped.double().mean()) >= share and float(live.double().mean()) >= share, "small columns snap"


@pytest.mark.parametrize("shape", [(7, 40, 9), (5, 1100, 1), (4, 130, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("flags", ROW_COMBOS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_native_columns_snap_test_at_the_threshold(flags, dtype, shape):
    """The zero threshold at the median norm of the columns: about half the live columns take the whole snap test
    (is the moved column no longer than before, or ||g|| at most 2 kappa), which reads every sum of the step
    (||W_moved||^2, <W_moved, theta_old>, ||theta_old||^2, ||g||^2): each must be the spec's for the same columns
    to snap."""
    full = _full(flags)
    rows, columns, r = shape
    args = _columns_problem(rows, columns, r, dtype, full["rule"], full["amsgrad"], full["momentum"],
                            HYPER["grad_scale"] if full["scaled"] else 1.0, full["maximize"], dead=False)
    u, W = args[2], args[3]
    threshold = float((u.abs() * W.square().sum(dim=(0, 2)).sqrt())[columns // 3 + 2: -3].median())
    _step_against_the_spec(native.columns_step, "column", args, full, dtype, zero_threshold=threshold)
    snapped = float((args[2][columns // 3 + 2: -3] == 0).double().mean())
    assert 0.1 < snapped < 0.9, f"the threshold splits the live columns ({snapped:.2f} snapped)"


@pytest.mark.parametrize("sparsity", ["element", "row", "column"])
def test_torch_compile_of_the_step_runs_the_native_loops_eagerly(sparsity):
    """torch.compile(optimizer.step) on groups the native loops take: one opaque eager call (no graph), the same
    weights as the eager step, bit for bit."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(5)
    start = torch.randn(12, 8, generator=gen) * 0.3
    p, q = start.clone().requires_grad_(), start.clone().requires_grad_()
    kappa = 0.02 if sparsity == "element" else 0.2
    opt, twin = (SpreadAdam([t], lr=0.05, kappa=kappa, sparsity=sparsity) for t in (p, q))
    step = torch.compile(opt.step)
    for _ in range(8):
        g = torch.randn(12, 8, generator=gen) * 0.1 + 0.5 * p.detach()
        p.grad, q.grad = g.clone(), g.clone()
        step()
        twin.step()
    assert opt._paths == ["compiled"] and torch.equal(p, q)
    assert sparsity != "element" or bool((p == 0).any())  # (element: exact zeros made inside the compiled region)
    assert torch._dynamo.explain(opt.step)().graph_count == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nonfinite_check_equals_isfinite(dtype):
    """The native non-finite check against ``torch.isfinite``: NaN, +-inf, huge, subnormal and zero entries, at every
    position of a ragged length (vector body and tail)."""
    info = torch.finfo(dtype)
    specials = [float("nan"), float("inf"), float("-inf"), info.max, -info.max, info.tiny / 4, -0.0, 0.0]
    for n in (1, 17, 1000):
        for value in specials:
            for position in {0, n // 2, n - 1}:
                g = torch.randn(n, dtype=dtype)
                g[position] = value
                assert native.nonfinite([g]) == [int(not bool(torch.isfinite(g).all()))], (n, value, position)


def test_nonfinite_check_of_many_tensors_in_one_call():
    """One call checks tensors of both dtypes and any length (empty ones too), each flag its own tensor's."""
    grads = [torch.randn(n, dtype=dtype) for n, dtype in ((5, torch.float32), (0, torch.float64), (300, torch.float64),
                                                          (64, torch.float32), (1, torch.float64))]
    assert native.nonfinite(grads) == [0] * 5 and native.nonfinite([]) == []
    grads[2][299] = float("inf")
    grads[3][0] = float("nan")
    assert native.nonfinite(grads) == [0, 0, 1, 1, 0]


def test_the_source_ships_with_the_package_and_its_absence_is_a_reason(monkeypatch, tmp_path):
    """The C source is package data (a wheel carries it: the loops are built on the user's machine); an
    installation without it reports why the native loops are off instead of failing."""
    tomllib = pytest.importorskip("tomllib")  # (Python 3.11+)
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "*.c" in pyproject["tool"]["setuptools"]["package-data"]["spread_optim.kernels"]
    monkeypatch.setattr(native, "SOURCE", tmp_path / "missing.c")
    native._library.cache_clear()
    try:
        assert "source is missing" in native.unavailable()
    finally:
        native._library.cache_clear()


@pytest.mark.parametrize("kernel", ["element", "rows", "columns"])
def test_a_step_split_across_threads_equals_one_thread(kernel, monkeypatch):
    """A large step is cut into one share per torch CPU thread, tensors split where a share ends (columns tensors
    whole, shared out by size): the same numbers and the same counts of written weights as one call (forced here on
    small tensors)."""
    monkeypatch.setattr(native, "PARALLEL_MIN", 1)
    shapes = {"element": [(1000,), (37,), (2003,)], "rows": [(40, 7), (3, 64), (61, 5)],
              "columns": [(5, 48, 1), (7, 40, 9), (4, 130, 9), (3, 1100, 1)]}[kernel]
    values = list(HYPER.values())
    runs = []
    for threads in (1, 3):
        items = []
        for k, shape in enumerate(shapes):
            if kernel == "element":
                args = _problem(shape[0], torch.float32, "adam", True, False, False, 1.0, seed=k)
            elif kernel == "rows":
                args = _rows_problem(*shape, torch.float32, "adam", True, False, 1.0)
            else:  # (dead columns in some tensors, none in others: the loop's two kinds of sweeps)
                args = _columns_problem(*shape, torch.float32, "adam", True, False, 1.0, dead=k % 2 == 0)
            items.append((*args, values))
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            left = native.batch_step(kernel, items, rule="adam", amsgrad=True)
        finally:
            torch.set_num_threads(previous)
        runs.append((left, [t.clone() for item in items for t in _tensors(list(item[:6]))]))
    assert runs[0][0] == runs[1][0] and all(c > 0 for c in runs[0][0])  # (each tensor has written weights)
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def _checked_items(dtype: torch.dtype, full: dict) -> list[tuple]:
    """Four columns tensors (Linear-like, conv-like, rows over 4 KB; dead columns in some, written weights in all)."""
    scale = HYPER["grad_scale"] if full["scaled"] else 1.0
    return [(*_columns_problem(*shape, dtype, full["rule"], full["amsgrad"], full["momentum"], scale,
                               maximize=full["maximize"], dead=k % 2 == 0), list(HYPER.values()))
            for k, shape in enumerate([(5, 48, 1), (7, 40, 9), (4, 130, 9), (3, 1100, 1)])]


def _launch(items: list[tuple], full: dict, checked: bool):
    return native.batch_step("columns", items, **full, checked=checked)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("flags", ROW_COMBOS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_the_checked_columns_call_equals_the_call(flags, dtype):
    """The columns call whose sums pass is the non-finite check (every tensor's sums first, the steps after, in the
    other order) steps as the plain call, bit for bit, with the same counts of written columns."""
    full = _full(flags)
    runs = []
    for checked in (False, True):
        items = _checked_items(dtype, full)
        if full["first"]:
            for item in items:
                item[4][0].fill_(float("nan")), item[5][0].fill_(float("nan"))
        left = _launch(items, full, checked)
        runs.append((left, [t.clone() for item in items for t in _tensors(list(item[:6]))]))
    assert runs[0][0] == runs[1][0] and all(c > 0 for c in runs[0][0])
    assert all(torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) and torch.equal(a.signbit(), b.signbit())
               for a, b in zip(runs[0][1], runs[1][1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_the_checked_columns_call_finds_every_nonfinite_gradient_and_moves_nothing(value, dtype):
    """An inf or a NaN anywhere in any tensor's gradient (first or last tensor and entry, a dead column's, a
    written column's, the odd row of a pair of rows over 4 KB): None, and nothing moved."""
    full = _full({})
    positions = [(0, (0, 0, 0)), (3, (2, 1099, 0)), (1, (3, 0, 4)), (0, (4, 47, 0)), (2, (1, 129, 8)),
                 (3, (2, 500, 0)), (1, (6, 39, 8))]  # (tensor 0 and 2: dead columns first; 3: rows over 4 KB)
    for tensor, index in positions:
        items = _checked_items(dtype, full)
        items[tensor][0][index] = value
        before = [t.clone() for item in items for t in _tensors(list(item[:6]))]
        assert _launch(items, full, True) is None, (tensor, index)
        after = [t for item in items for t in _tensors(list(item[:6]))]
        assert all(torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) for a, b in zip(before, after)), (tensor, index)
    assert _launch(_checked_items(dtype, full), full, True) is not None


def test_the_threads_pool_is_made_again_in_a_forked_child(monkeypatch):
    """A process forked after a threaded step (a DataLoader worker, say) gets a pool of its own: its copy of the
    parent's has no threads, and using it would hang."""
    import os

    monkeypatch.setattr(native, "PARALLEL_MIN", 1)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        items = [(*_problem(64, torch.float32, "adam", False, False, False, 1.0), list(HYPER.values()))]
        native.batch_step("element", items, rule="adam")  # makes the parent's pool
        pid = os.fork()
        if pid == 0:  # the child: a threaded step must finish
            try:
                native.batch_step("element", items, rule="adam")
                os._exit(0)
            except BaseException:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        torch.set_num_threads(previous)
