"""A cell and losses defined only in tests/user_cell.py derive and check out.

The cell uses a diagonal weight, Hadamard products, softplus and a user's SymPy
expression through m.expr; the losses come from derive.custom_loss. Each is
checked like a built-in: reference gradients against float64 central finite
differences (tier 2) and against the exact derivative of the unrolled loss
(tier 1, tests/unrolled.py).
"""

import os

import numpy as np
import pytest
import sympy as sp

import user_cell
from bpttgen.derive import derive, reference
from bpttgen.derive.loader import load_model
from helpers import finite_difference, max_relative_error, random_problem, tiny_sizes
from unrolled import symbolic_loss_and_grads

PATH = os.path.join(os.path.dirname(__file__), "user_cell.py")
LOSSES = sorted(user_cell.LOSSES)


def test_definition_file_loads_and_derives():
    model = load_model(PATH)
    assert model.name == "user_cell"
    D = derive(model)
    assert D.param("p_f").role == "diagonal" and D.param("p_f").kind == "vector"
    assert {n.name: n.phase for n in D.nodes}["u2"] == "post"  # softplus(h) feeds no state
    n = D.node("n")
    assert n.expr.has(sp.log) and n.expr.has(sp.exp)  # the user's logaddexp, as given
    # derivatives are written through stored values: tanh' = 1 - n^2, sigma' = f (1 - f)
    partials = {(t.via, t.target): t.expr for t in D.backward.terms if t.rule == "local"}
    nsym, fsym = sp.Symbol("n", real=True), sp.Symbol("f", real=True)
    assert partials[("n", "U_n_u1")].has(nsym)
    assert sp.simplify(partials[("f", "b_f")] - fsym * (1 - fsym)) == 0
    assert {t.target for t in D.backward.leaving("h")} == {"f", "h_prev", "n"}


def test_custom_loss_errors_are_derived():
    y, dd = sp.Symbol("y", real=True), sp.Symbol("d", real=True)
    # d/dz log cosh(z - d) = tanh(z - d), with y = z
    err = user_cell.log_cosh.error()
    assert sp.simplify((err - sp.tanh(y - dd)).rewrite(sp.exp)) == 0
    # softmax at temperature 2: (y - d) / 2 with y the tempered softmax
    assert sp.simplify(user_cell.tempered_softmax.error() - (y - dd) / 2) == 0


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("variant", ["plain", "l2+mask"])
def test_reference_matches_finite_differences(loss, variant):
    D = derive(user_cell.model(loss=user_cell.LOSSES[loss]))
    params, x, targets, state0 = random_problem(D, tiny_sizes(D, 2), T=3, B=2)
    kw = {"state0": state0}
    if variant == "l2+mask":
        kw.update(l2=0.1, mask=np.array([[1, 0], [1, 1], [0, 1]], dtype=float))
    _, grads = reference.loss_and_grads(D, params, x, targets, **kw)
    fd = finite_difference(lambda p: reference.loss_and_grads(D, p, x, targets, **kw)[0],
                           params)
    for name in params:
        assert np.any(grads[name] != 0), name
        assert max_relative_error(grads[name], fd[name]) < 1e-6, name


@pytest.mark.parametrize("loss", LOSSES)
def test_derived_recurrence_equals_unrolled_derivative(loss):
    model = user_cell.model(loss=user_cell.LOSSES[loss])
    D = derive(model)
    sizes = tiny_sizes(D, 2)
    params, x, targets, state0 = random_problem(D, sizes, T=3, B=1, seed=1)
    kw = {"l2": 0.05, "mask": np.array([[1.0], [1.0], [0.5]])}
    value, grads = reference.loss_and_grads(D, params, x, targets, state0=state0, **kw)
    sym_value, sym = symbolic_loss_and_grads(model, sizes, params, x, targets, state0, **kw)
    assert abs(value - sym_value) <= 1e-12 * abs(sym_value)
    for name in params:
        assert max_relative_error(grads[name], sym[name]) < 1e-12, name
