"""Bad input gets a clear error naming the param group and the key (the project's rule: name the group and the key, and nothing moves)."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch

from spread_optim import SpreadAdam, SpreadOptimizer, SpreadSGD


def _params(*shapes, dtype=torch.float32):
    return [torch.nn.Parameter(torch.randn(*s, dtype=dtype)) for s in shapes]


def _assert_names(excinfo, group: int, *words: str) -> None:
    """The message names ``param group <group>`` (as a whole number) and each of ``words``."""
    msg = str(excinfo.value)
    assert re.search(rf"param group {group}\b", msg), msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


def _three_groups(**bad):
    """Groups 0 and 1 are fine, group 2 carries the bad setting (checks the index is not hard-coded)."""
    a, b, c = _params((3,), (4,), (2, 3))
    return [{"params": [a]}, {"params": [b], "kappa": 0.1}, {"params": [c], "kappa": 0.1, **bad}]


# ---------------------------------------------------------------------------------------------------
# kappa

BAD_KAPPAS = [
    pytest.param(-1.0, ValueError, id="negative"),
    pytest.param(-1e-12, ValueError, id="tiny-negative"),
    pytest.param(float("nan"), ValueError, id="nan"),
    pytest.param(float("inf"), ValueError, id="inf"),
    pytest.param("0.1", TypeError, id="string"),
    pytest.param(None, TypeError, id="none"),
    pytest.param([0.1], TypeError, id="list"),
]


@pytest.mark.parametrize("kappa, exc", BAD_KAPPAS)
def test_bad_kappa_at_construction(kappa, exc):
    with pytest.raises(exc) as e:
        SpreadSGD(_three_groups(kappa=kappa), lr=0.1)
    _assert_names(e, 2, "'kappa'")
    # as a default for every group it is group 0 that fails
    with pytest.raises(exc) as e:
        SpreadSGD(_params((3,)), lr=0.1, kappa=kappa)
    _assert_names(e, 0, "'kappa'")


@pytest.mark.parametrize("kappa, exc", BAD_KAPPAS)
def test_bad_kappa_in_add_param_group(kappa, exc):
    a, b = _params((3,), (4,))
    opt = SpreadSGD([a], lr=0.1, kappa=0.1)
    with pytest.raises(exc) as e:
        opt.add_param_group({"params": [b], "kappa": kappa})
    _assert_names(e, 1, "'kappa'")
    # the rejected group is not left behind: the same tensor can be added with a valid kappa
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [b], "kappa": 0.2})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["kappa"] == 0.2


@pytest.mark.parametrize("kappa", [-1, float("nan"), float("inf"), "0.1"])
@pytest.mark.parametrize("stepped_as", ["sparse", "dense"])
def test_bad_kappa_set_later_raises_at_step(kappa, stepped_as):
    a, b = _params((3,), (4,))
    opt = SpreadSGD([{"params": [a]}, {"params": [b], "kappa": 0.1 if stepped_as == "sparse" else 0.0}], lr=0.1, kappa=0.1)
    for p in (a, b):
        p.grad = torch.ones_like(p)
    opt.step()
    before = [a.detach().clone(), b.detach().clone()]
    opt.param_groups[1]["kappa"] = kappa
    with pytest.raises((ValueError, TypeError)) as e:
        opt.step()
    _assert_names(e, 1, "'kappa'")
    # the message is about the bad value, not about a dense/sparse switch
    assert "became" not in str(e.value), str(e.value)
    # nothing moved
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])


# ---------------------------------------------------------------------------------------------------
# sparsity specs


def test_unknown_sparsity_string():
    with pytest.raises(ValueError) as e:
        SpreadSGD(_three_groups(sparsity="rows"), lr=0.1)
    _assert_names(e, 2, "'sparsity'", "rows")


def test_group_ids_of_wrong_shape():
    (p,) = _params((3, 4))
    ids = torch.zeros(4, 3, dtype=torch.long)  # same numel, wrong shape
    with pytest.raises(ValueError) as e:
        SpreadSGD([{"params": [_params((2,))[0]]}, {"params": [p], "sparsity": ids}], lr=0.1, kappa=0.1)
    _assert_names(e, 1, "'sparsity'", "(4, 3)", "(3, 4)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_group_ids_must_be_integer(dtype):
    (p,) = _params((3, 4))
    ids = torch.zeros(3, 4, dtype=dtype)
    with pytest.raises((TypeError, ValueError)) as e:
        SpreadSGD([p], lr=0.1, kappa=0.1, sparsity=ids)
    _assert_names(e, 0, "'sparsity'")


def test_negative_group_ids():
    (p,) = _params((3, 4))
    ids = torch.arange(12).reshape(3, 4) - 1
    with pytest.raises(ValueError) as e:
        SpreadSGD([p], lr=0.1, kappa=0.1, sparsity=ids)
    _assert_names(e, 0, "'sparsity'")


def test_row_on_scalar_parameter():
    scalar = torch.nn.Parameter(torch.tensor(1.5))
    with pytest.raises(ValueError) as e:
        SpreadSGD([{"params": _params((2, 2))}, {"params": [scalar]}], lr=0.1, kappa=0.1, sparsity="row")
    _assert_names(e, 1, "'sparsity'", "row")


def test_column_on_vector_parameter():
    with pytest.raises(ValueError) as e:
        SpreadSGD(_params((5,)), lr=0.1, kappa=0.1, sparsity="column")
    _assert_names(e, 0, "'sparsity'", "column")


def test_sparsity_changed_later_is_validated_at_step():
    (p,) = _params((5,))
    opt = SpreadSGD([p], lr=0.1, kappa=0.1, sparsity="row")
    opt.param_groups[0]["sparsity"] = "column"  # before any step: validated when the step prepares factors
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError) as e:
        opt.step()
    _assert_names(e, 0, "'sparsity'")


# ---------------------------------------------------------------------------------------------------
# parameters


def test_same_tensor_in_two_groups_names_both():
    a, b, c = _params((3,), (4,), (5,))
    with pytest.raises(ValueError) as e:
        SpreadSGD([{"params": [a, b]}, {"params": [c]}, {"params": [b]}], lr=0.1)
    _assert_names(e, 2)
    assert re.search(r"param group 0\b", str(e.value)), str(e.value)
    opt = SpreadSGD([{"params": [a]}, {"params": [b]}], lr=0.1)
    with pytest.raises(ValueError) as e:
        opt.add_param_group({"params": [c, b]})
    _assert_names(e, 2)
    assert re.search(r"param group 1\b", str(e.value)), str(e.value)
    assert len(opt.param_groups) == 2


def test_complex_parameter_in_sparse_group():
    z = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    with pytest.raises(TypeError) as e:
        SpreadSGD([{"params": _params((2,))}, {"params": [z], "kappa": 0.1}], lr=0.1)
    _assert_names(e, 1, "complex")


def test_integer_parameter_in_sparse_group():
    n = torch.zeros(3, dtype=torch.int64)  # a leaf that cannot require grad
    with pytest.raises(TypeError) as e:
        SpreadSGD([{"params": _params((2,))}, {"params": [n], "kappa": 0.1}], lr=0.1)
    _assert_names(e, 1, "int64")


def test_complex_parameter_in_dense_group_is_allowed():
    z = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    (w,) = _params((4,))
    opt = SpreadSGD([{"params": [z]}, {"params": [w], "kappa": 0.1}], lr=0.1, momentum=0.9)
    ref = torch.optim.SGD([z_ref := torch.nn.Parameter(z.detach().clone())], lr=0.1, momentum=0.9)
    for _ in range(3):
        for p in (z, z_ref):
            p.grad = torch.full_like(p, 1 - 2j)
        w.grad = torch.ones_like(w)
        opt.step()
        ref.step()
    assert torch.equal(z, z_ref)  # the dense group is exactly the base


def test_sparse_gradient_in_sparse_group_raises_at_step():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    (w,) = _params((3,))
    opt = SpreadSGD([{"params": [w]}, {"params": emb.parameters(), "kappa": 0.1}], lr=0.1)
    emb(torch.tensor([1, 2, 2])).sum().backward()
    assert emb.weight.grad.is_sparse
    before = emb.weight.detach().clone()
    with pytest.raises((TypeError, ValueError)) as e:
        opt.step()
    _assert_names(e, 1, "sparse")
    assert torch.equal(emb.weight, before)
    # the same embedding in a dense group is plain SGD, which supports sparse gradients
    emb2 = torch.nn.Embedding(10, 4, sparse=True)
    opt2 = SpreadSGD(emb2.parameters(), lr=0.1)
    before2 = emb2.weight.detach().clone()
    emb2(torch.tensor([1])).sum().backward()
    opt2.step()
    torch.testing.assert_close(emb2.weight[1], before2[1] - 0.1)
    assert torch.equal(emb2.weight[0], before2[0])


# ---------------------------------------------------------------------------------------------------
# other spread keys


def test_unknown_init():
    with pytest.raises(ValueError) as e:
        SpreadSGD(_three_groups(init="random"), lr=0.1)
    _assert_names(e, 2, "'init'", "random")


@pytest.mark.parametrize("threshold", [-1e-6, float("nan")])
def test_bad_zero_threshold(threshold):
    with pytest.raises(ValueError) as e:
        SpreadSGD(_three_groups(zero_threshold=threshold), lr=0.1)
    _assert_names(e, 2, "'zero_threshold'")


def test_share_groups_with_element_sparsity():
    with pytest.raises(ValueError) as e:
        SpreadSGD(_three_groups(share_groups=True), lr=0.1)
    _assert_names(e, 2, "'share_groups'")


def test_share_groups_column_needs_equal_column_counts():
    a, b, c = _params((4, 5), (3, 5), (3, 6))
    SpreadSGD([{"params": [a, b]}], lr=0.1, kappa=0.1, sparsity="column", share_groups=True)  # fine
    with pytest.raises(ValueError) as e:
        SpreadSGD(
            [{"params": _params((2,))}, {"params": [a, b, c], "kappa": 0.1, "sparsity": "column", "share_groups": True}],
            lr=0.1,
        )
    _assert_names(e, 1, "'share_groups'")


# ---------------------------------------------------------------------------------------------------
# base


def test_base_instance_instead_of_class():
    params = _params((3,))
    with pytest.raises(TypeError, match="base"):
        SpreadOptimizer(params, torch.optim.SGD(params, lr=0.1), lr=0.1)


def test_unknown_base_string():
    with pytest.raises(ValueError, match="base") as e:
        SpreadOptimizer(_params((3,)), "sgdd", lr=0.1)
    assert "sgdd" in str(e.value)


def test_invalid_base_kwargs_raise_torchs_own_error():
    with pytest.raises(ValueError, match="Invalid learning rate"):
        SpreadOptimizer(_params((3,)), "sgd", lr=-1)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        SpreadSGD(_params((3,)), lr=-1, kappa=0.1)
    with pytest.raises(TypeError):
        SpreadOptimizer(_params((3,)), torch.optim.SGD, lr=0.1, not_an_option=1)


def test_lbfgs_groups_must_share_base_options():
    a, b = _params((3,), (3,))
    with pytest.raises(ValueError) as e:
        SpreadOptimizer([{"params": [a]}, {"params": [b], "lr": 0.5}], torch.optim.LBFGS, lr=1.0)
    _assert_names(e, 1, "'lr'")


def test_lbfgs_groups_may_differ_in_kappa():
    a = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = SpreadOptimizer(
        [{"params": [a], "kappa": 0.1}, {"params": [b], "kappa": 0.0}], torch.optim.LBFGS,
        lr=1.0, max_iter=100, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = ((a - 1) ** 2).sum() + ((b + 1) ** 2).sum()
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    # (a-1)^2 + 0.2|a| is minimised at a = 0.9; b is unregularised
    torch.testing.assert_close(a.detach(), torch.full_like(a, 0.9), atol=1e-6, rtol=0)
    torch.testing.assert_close(b.detach(), torch.full_like(b, -1.0), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------
# dense <-> sparse after the first step


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda ps: SpreadSGD(ps, lr=0.1, momentum=0.9), id="sgd-momentum"),
        pytest.param(lambda ps: SpreadAdam(ps, lr=0.1), id="adam"),
        # plain SGD keeps no base state: "stepped" must not be inferred from the state alone
        pytest.param(lambda ps: SpreadSGD(ps, lr=0.1), id="sgd-plain"),
    ],
)
def test_dense_group_cannot_become_sparse_after_stepping(make):
    a, b = _params((3,), (4,))
    opt = make([{"params": [a], "kappa": 0.1}, {"params": [b]}])
    for p in (a, b):
        p.grad = torch.ones_like(p)
    opt.step()
    opt.param_groups[1]["kappa"] = 0.1
    before = [a.detach().clone(), b.detach().clone()]
    with pytest.raises(ValueError) as e:
        opt.step()
    _assert_names(e, 1, "'kappa'")
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])


def test_sparse_group_cannot_become_dense_after_stepping():
    (a,) = _params((3,))
    opt = SpreadSGD([a], lr=0.1, kappa=0.1)
    a.grad = torch.ones_like(a)
    opt.step()
    opt.param_groups[0]["kappa"] = 0.0
    with pytest.raises(ValueError) as e:
        opt.step()
    _assert_names(e, 0, "'kappa'")


def test_valid_settings_construct_without_error():
    """The negative tests above are not passing because everything raises."""
    a, b, c = _params((4, 5), (4, 3), (6,))
    ids = torch.arange(20).reshape(4, 5) % 3
    opt = SpreadSGD(
        [
            {"params": [a], "kappa": 0.1, "sparsity": ids},
            {"params": [b], "kappa": torch.tensor(0.2), "sparsity": "row", "init": "unbalanced", "zero_threshold": 0},
            {"params": [c], "kappa": 0},
        ],
        lr=0.1,
    )
    for p in (a, b, c):
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(math.isfinite(float(p.detach().sum())) for p in (a, b, c))


# ---------------------------------------------------------------------------------------------------
# values torch accepts for its own hyperparameters are accepted for spread's keys


@pytest.mark.parametrize("kappa", [np.float32(0.1), np.float64(0.1), np.int64(1), torch.tensor(0.1), torch.tensor([0.1])])
def test_numpy_and_tensor_kappa_are_accepted(kappa):
    (p,) = _params((3, 4))
    opt = SpreadSGD([p], lr=0.1, kappa=kappa)
    assert isinstance(opt.param_groups[0]["kappa"], float) and opt.param_groups[0]["kappa"] == pytest.approx(float(kappa))
    p.grad = torch.ones_like(p)
    opt.step()
    assert "U" in opt.state[p]


@pytest.mark.parametrize("threshold", [np.float32(1e-4), torch.tensor(1e-4), 0, float("inf")])
def test_zero_threshold_values_torch_would_accept(threshold):
    (p,) = _params((5,))
    opt = SpreadSGD([p], lr=0.1, kappa=0.1, zero_threshold=threshold)
    p.grad = torch.ones_like(p)
    opt.step()


@pytest.mark.parametrize("share", [np.bool_(True), torch.tensor(True)])
def test_numpy_bool_share_groups(share):
    a, b = _params((4, 3), (2, 3))
    opt = SpreadSGD([a, b], lr=0.1, kappa=0.1, sparsity="column", share_groups=share)
    assert opt.param_groups[0]["share_groups"] is True


@pytest.mark.parametrize("typo, meant", [("kapa", "kappa"), ("kappaa", "kappa"), ("sparsty", "sparsity"), ("zero_treshold", "zero_threshold")])
def test_a_typo_in_a_spread_key_warns(typo, meant):
    a, b = _params((3,), (4,))
    with pytest.warns(UserWarning, match=f"'{typo}'.*did you mean '{meant}'"):
        SpreadSGD([{"params": [a]}, {"params": [b], typo: 0.1}], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SpreadSGD([{"params": [a], "custom_tag": "x"}], lr=0.1)  # torch keeps unknown keys: no warning far from ours


# ---------------------------------------------------------------------------------------------------
# kkt_residual never says "optimal" by mistake


def test_kkt_residual_before_backward_raises():
    (p,) = _params((4,))
    opt = SpreadSGD([p], lr=0.1, kappa=0.1)
    with pytest.raises(RuntimeError, match="backward"):
        opt.kkt_residual()


def test_kkt_residual_of_a_nan_gradient_is_nan():
    a, b = _params((4,), (3, 2))
    opt = SpreadSGD([{"params": [a]}, {"params": [b], "sparsity": "row"}], lr=0.1, kappa=0.1)
    a.grad, b.grad = torch.zeros(4), torch.zeros(3, 2)
    assert opt.kkt_residual() > 0 and not math.isnan(opt.kkt_residual())
    for p in (a, b):
        p.grad = torch.zeros_like(p)
        p.grad.view(-1)[0] = float("nan")
        assert math.isnan(opt.kkt_residual())
        p.grad = torch.zeros_like(p)


# ---------------------------------------------------------------------------------------------------
# differentiable: the base's business at kappa = 0, refused in a sparse group


def test_differentiable_passes_to_the_base_in_dense_groups():
    """As torch's own tests use it: a non-leaf parameter, the step differentiable with respect to its inputs."""
    results = []
    for cls in (torch.optim.SGD, SpreadSGD):
        w = torch.ones(3, requires_grad=True)
        p = w * 2.0  # a non-leaf tensor
        p.retain_grad()
        opt = cls([p], lr=0.1, momentum=0.9, differentiable=True)
        p.grad = torch.full((3,), 0.5, requires_grad=True)
        opt.step()
        p.sum().backward()
        results.append((p.detach().clone(), w.grad.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    (p,) = _params((3,))
    with pytest.raises(ValueError) as e:
        SpreadSGD([{"params": [p]}, {"params": _params((2,)), "kappa": 0.1}], lr=0.1, differentiable=True)
    _assert_names(e, 1, "differentiable")
