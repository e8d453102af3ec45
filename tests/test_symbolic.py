"""Tier 1: the derived recurrence equals the derivative of the unrolled model.

For every case in helpers.CASES (every built-in model, every loss) at tiny sizes
(2 and 3 alternating, so no transpose can hide; T = 3, B = 1) the whole unrolled
loss is written as one SymPy expression in one symbol per parameter element,
straight from the model's node definitions (tests/unrolled.py), differentiated
exactly and compared with derive.reference.loss_and_grads, which runs derive()'s
accumulated backward recurrence, to 1e-12 relative.
"""

import dataclasses

import numpy as np
import pytest
import sympy as sp

from bpttgen.derive import Model, derive, reference, sse, tanh
from bpttgen.derive.models import elman
from helpers import CASES, max_relative_error, random_problem, tiny_sizes
from unrolled import evaluate, exact_gradient, symbolic_loss_and_grads, unrolled_loss

TOL = 1e-12
MASK = np.array([[1.0], [0.0], [1.0]])  # (T, B): drop the middle step's loss


def _compare(model, sizes, *, T=3, seed=0, **kw):
    """Reference and unrolled loss and gradients; returns both for more checks."""
    D = derive(model)
    params, x, targets, state0 = random_problem(D, sizes, T=T, B=1, seed=seed)
    loss, grads = reference.loss_and_grads(D, params, x, targets, state0=state0, **kw)
    sym_loss, sym_grads = symbolic_loss_and_grads(model, sizes, params, x, targets, state0,
                                                  **kw)
    assert abs(loss - sym_loss) <= TOL * abs(sym_loss)
    for name in params:
        assert np.any(sym_grads[name] != 0), f"{name} does not reach the loss"
        assert max_relative_error(grads[name], sym_grads[name]) < TOL, name
    return D, (params, x, targets, state0), (loss, grads)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("variant", ["plain", "l2+mask"])
def test_derived_recurrence_equals_unrolled_derivative(case, variant):
    model = CASES[case]()
    kw = {"l2": 0.1, "mask": MASK} if variant == "l2+mask" else {}
    _compare(model, tiny_sizes(derive(CASES[case]()), 2), **kw)


def _literal_gradient(model, sizes, params, x, targets, state0, **kw):
    """sympy.diff of the whole (evaluated) unrolled loss, one parameter element at
    a time, evaluated in 40 digits."""
    L, symbols = unrolled_loss(model, sizes, x, targets, state0, as_written=False, **kw)
    values = {s: params[n][idx] for n in params for idx, s in np.ndenumerate(symbols[n])}
    by_symbol = {s: evaluate(sp.diff(L, s), values) for s in values}
    grads = {n: np.array([float(by_symbol[s]) for s in symbols[n].ravel()])
             .reshape(symbols[n].shape) for n in params}
    return L, values, by_symbol, grads


def test_exact_gradient_is_sympy_diff_of_the_whole_expression():
    """Validates the checker: on the Elman net at H = 2, T = 3 (DESIGN.md's tier-1
    example) plain ``sympy.diff`` of the one expression, per parameter element,
    equals both exact_gradient's chain rule over its subexpressions and the
    derived recurrence."""
    model = elman()
    sizes = {"I": 2, "H": 2, "O": 2}
    D, problem, (_, grads) = _compare(model, sizes)
    L, values, by_symbol, literal = _literal_gradient(model, sizes, *problem)
    for name, g in literal.items():
        assert max_relative_error(g, grads[name]) < TOL, name
    _, chain = exact_gradient(L, values)  # both in 40 digits: they agree far below 1e-12
    for s, v in by_symbol.items():
        assert abs(v - chain[s]) <= 1e-30 * max(1, abs(v)), s


def _last_step_model(at):
    m = Model("last_" + at, sizes=("I", "H", "O"))
    x = m.input("x", "I")
    h = m.state("h", "H")
    m.update(h, tanh(m.matrix("W_xh", "H", "I") @ x + m.matrix("W_hh", "H", "H") @ h.prev
                     + m.bias("b_h", "H")))
    m.output(m.matrix("W_hy", "O", "H") @ h + m.bias("b_y", "O"), loss=sse, at=at)
    return m


def test_loss_at_the_last_step_only():
    sizes = {"I": 2, "H": 2, "O": 3}
    model = _last_step_model("last")
    D, problem, (loss, grads) = _compare(model, sizes)
    assert D.loss.at == "last"
    # plain sympy.diff here too: one loss term keeps the expression small
    *_, literal = _literal_gradient(model, sizes, *problem)
    for name in grads:
        assert max_relative_error(literal[name], grads[name]) < TOL, name
    # and it is not the loss at every step: the schedule reached the gradients
    every = derive(_last_step_model("every"))
    loss_every, grads_every = reference.loss_and_grads(every, *problem[:3], state0=problem[3])
    assert abs(loss_every - loss) > 1e-3
    assert max_relative_error(grads_every["W_hh"], grads["W_hh"]) > 1e-3
    # a mask that keeps only the last step gives the same loss on the "every" model
    masked = reference.loss_and_grads(every, *problem[:3], state0=problem[3],
                                      mask=np.array([[0.0], [0.0], [1.0]]))
    assert abs(masked[0] - loss) <= TOL * abs(loss)


def test_check_detects_a_wrong_partial_on_the_recurrent_path():
    """The comparison can fail: scaling the recurrent partial dh_t/d(W_hh h_{t-1})
    by 1.01 is caught, though it only matters through time."""
    model = elman()
    sizes = tiny_sizes(derive(elman()), 2)
    D = derive(model)
    bw = D.backward
    target = next(t for t in bw.terms if t.rule == "local" and t.via == "h"
                  and t.target.startswith("W_hh"))
    broken = dataclasses.replace(D, backward=dataclasses.replace(bw, terms=tuple(
        dataclasses.replace(t, expr=t.expr * sp.Float(1.01)) if t is target else t
        for t in bw.terms)))
    params, x, targets, state0 = random_problem(D, sizes, T=3, B=1)
    _, grads = reference.loss_and_grads(broken, params, x, targets, state0=state0)
    _, sym = symbolic_loss_and_grads(model, sizes, params, x, targets, state0)
    assert max_relative_error(grads["W_hh"], sym["W_hh"]) > 1e-4
    assert max_relative_error(grads["W_hy"], sym["W_hy"]) < TOL  # readout untouched
