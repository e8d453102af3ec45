"""Reductions over the units of a vector (m.sum, m.mean, m.layernorm, m.rmsnorm).

The built-ins layernorm_lstm and rmsnorm go through every registry-driven tier
(tests/test_symbolic.py, test_codegen.py, test_rtrl.py, test_artbp.py, test_cuda.py,
test_latex.py). Here, without compiling anything: a cell with a reduction in each
phase (over the input before the loop, over the previous state in the loop, over the
new state in the readout), a reduction reading a reduction and a parameter inside a
summand, against the unrolled symbolic gradient; the README's LayerNorm cell; the
definition errors, each at the user's line.
"""

import os
import re
import sys

import numpy as np
import pytest

from bpttgen.derive import DefinitionError, Model, derive, reference, sigmoid, sse, tanh
from bpttgen.derive.loader import load_model
from helpers import (finite_difference, max_relative_error, random_problem, readme_blocks,
                     tiny_sizes)
from unrolled import symbolic_loss_and_grads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def every_phase():
    m = Model("reduce_all", sizes=("I", "H", "O"))
    x, h = m.input("x", "I"), m.state("h", "H")
    p = m.diagonal("p", "I")
    sx = m.sum(sigmoid(p * x), name="sx")  # pre: reads only the input
    mu = m.mean(h.prev, name="mu")  # loop
    g = m.gain("gamma", "H")
    var = m.mean(g * (h.prev - mu) ** 2, name="var")  # a reduction of a reduction
    a = m.matrix("W", "H", "I") @ x + m.matrix("U", "H", "H") @ h.prev + m.bias("b", "H")
    m.update(h, tanh(a / (1 + var) + 0.1 * sx))
    r = m.rmsnorm(h, gain=m.gain("q", "H"), name="h")  # post: the readout's
    m.output(m.matrix("V", "O", "H") @ r + tanh(m.mean(h)), loss=sse)
    return m


def _readme_cell(tmp_path):
    blocks, _ = readme_blocks()
    path = tmp_path / "cell_ln.py"
    path.write_text(blocks["cell_ln.py"])
    return load_model(str(path))


@pytest.fixture(params=["every_phase", "readme"])
def model(request, tmp_path):
    return every_phase() if request.param == "every_phase" else _readme_cell(tmp_path)


def test_phases_and_kinds():
    D = derive(every_phase())
    phases = {n.name: n.phase for n in D.nodes if n.kind == "reduction"}
    assert phases == {"sx": "pre", "mu": "loop", "var": "loop", "ms_h": "post", "r1": "post"}
    assert D.node("var").args == ("h_prev", "mu") and D.node("var").params == ("gamma",)
    # a term into a reduction sums over the units of the node it leaves
    into_mu = [t for t in D.backward.terms if t.target == "mu"]
    assert into_mu and all(t.reduce for t in into_mu)


def test_reference_equals_the_unrolled_derivative(model):
    """Tier 1 (as tests/test_symbolic.py) and finite differences of the reference."""
    D = derive(model)
    sizes = tiny_sizes(D, 2)
    params, x, targets, state0 = random_problem(D, sizes, T=3, B=1, seed=3)
    loss, grads = reference.loss_and_grads(D, params, x, targets, state0=state0, l2=0.1)
    sym_loss, sym_grads = symbolic_loss_and_grads(model, sizes, params, x, targets, state0,
                                                  l2=0.1)
    assert loss == pytest.approx(sym_loss, rel=1e-12)
    for name in params:
        assert np.any(sym_grads[name] != 0), name
        assert max_relative_error(grads[name], sym_grads[name]) < 1e-12, name
    params, x, targets, state0 = random_problem(D, tiny_sizes(D, 3), T=4, B=2, seed=4)
    fd = finite_difference(
        lambda p: reference.loss_and_grads(D, p, x, targets, state0=state0)[0], params)
    _, grads = reference.loss_and_grads(D, params, x, targets, state0=state0)
    for name in params:
        assert max_relative_error(grads[name], fd[name]) < 1e-6, name


def test_the_derivation_prints_the_sums():
    text = derive(every_phase()).render("text")
    assert "var_t = Σ_{j=1}^H" in text  # the forward reduction, per element
    assert re.search(r"μ̄_t = .*1ᵀ", text)  # its adjoint: a sum over the units


def _line():
    return sys._getframe(1).f_lineno + 1


def _at(err, line):
    assert err.location.endswith(f"{os.path.basename(__file__)}:{line}"), err.location
    return str(err)


def test_definition_errors():
    m = Model("bad", sizes=("I", "H", "O"))
    x, h = m.input("x", "I"), m.state("h", "H")
    W = m.matrix("W", "H", "I")
    with pytest.raises(DefinitionError) as info:
        line = _line()
        m.sum(W)
    assert "sum() needs a vector" in _at(info.value, line)
    mu = m.mean(x)
    with pytest.raises(DefinitionError) as info:
        line = _line()
        m.matrix("V", "O", "H") @ mu
    assert "the right side must be a vector" in _at(info.value, line)
    with pytest.raises(DefinitionError) as info:
        line = _line()
        m.update(h, mu)
    assert "needs a vector" in _at(info.value, line)
    with pytest.raises(DefinitionError) as info:
        line = _line()
        m.layernorm(x, h.prev)
    assert "sizes ['H', 'I']" in _at(info.value, line)
    with pytest.raises(DefinitionError) as info:
        line = _line()
        m.layernorm(h.prev, gain=m.gain("gamma", "I"))
    assert "gain must be a vector of size H" in _at(info.value, line)
    with pytest.raises(DefinitionError) as info:
        line = _line()
        m.sum(h.prev, name="mu1")  # the name m.mean(x) took
    assert "already defined" in _at(info.value, line)
    m.update(h, tanh(W @ x + h.prev * mu))
    with pytest.raises(DefinitionError) as info:
        line = _line()
        m.output(m.sum(h), loss=sse)
    assert "expected a vector" in _at(info.value, line)


def test_layout_runs_reductions_per_row():
    """A reduction's block, and a backward that adds to a reduction's adjoint, run one
    row at a time with the unit loop inside: the CPU loop over rows, a CUDA thread per
    row (no two threads add to one row's sum)."""
    from bpttgen.codegen.plan import Plan
    from bpttgen.codegen.render_cuda import CudaPlan
    from bpttgen.derive.models import build

    D = derive(build("rmsnorm"))
    plan = Plan(D, share=True)
    block = plan.block_of["ms_a"]
    assert block.kind == "reduction" and block.forward_per_row and block.backward_per_row
    assert block.forward[0] == "for _r in range(_lo, _hi):"
    assert "for _k in range(H):" in block.forward_body
    assert plan.value("ms_a", "_r", "_k") == "ms_a_seq[_r, 0]"
    h = plan.block_of["h"]
    assert h.backward_per_row and not h.forward_per_row
    assert h.backward_body[-1].startswith("d_ms_a_seq[_r, 0] += d_ms_a")
    kernels = {k.name: k for k in CudaPlan(D).kernels}
    per_row = sorted(k.name for k in kernels.values() if k.per_row)
    # forward: h_prev products, a, ms_a, h; the backward in reverse: h, ms_a, ...
    assert per_row == ["_bw_loop_0", "_bw_loop_1", "_fw_loop_2"], per_row
