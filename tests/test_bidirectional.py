"""A bidirectional layer: a reverse state (``m.state(..., reverse=True)``) runs from the
last step down to the first, its ``prev`` the value at t+1, and its adjoint's recurrence
runs forward in time. What is particular to it: the refusals of a definition whose
directions depend on each other, the meaning of state0 and the final states, and the
algorithms that cannot run it. Gradients are checked by every tier through the built-in
``bielman`` (tests/helpers.py CASES)."""

import sys

import numpy as np
import pytest

from bpttgen.derive import DefinitionError, Model, derive, reference, sse, tanh
from bpttgen.derive.models.bidirectional import bielman
from helpers import max_relative_error, random_problem, tiny_sizes
from unrolled import symbolic_loss_and_grads


def _next_line():
    return sys._getframe(1).f_lineno + 1


def _two_directions():
    m = Model("bad", sizes=("I", "H", "O"))
    x = m.input("x", "I")
    return m, x, m.state("hf", "H"), m.state("hb", "H", reverse=True)


def test_a_forward_update_reading_a_reverse_state_is_refused_at_its_line():
    m, x, hf, hb = _two_directions()
    W, U = m.matrix("W", "H", "I"), m.matrix("U", "H", "H")
    m.update(hb, tanh(W @ x + U @ hb.prev))
    line = _next_line()
    m.update(hf, tanh(W @ x + hb.prev * hf.prev))
    m.output(m.matrix("V", "O", "H") @ (hf + hb), loss=sse)
    with pytest.raises(DefinitionError) as e:
        derive(m)
    assert e.value.location == f"{__file__}:{line}"
    assert "the update of 'hf'" in str(e.value) and "no order" in str(e.value)


def test_a_node_mixing_the_directions_on_the_recurrent_path_is_refused_at_its_line():
    m, x, hf, hb = _two_directions()
    U = m.matrix("U", "H", "H")
    m.update(hf, tanh(m.matrix("W", "H", "I") @ x + U @ hf.prev))
    line = _next_line()
    both = m.node("both", hf * hb.prev)
    m.update(hb, tanh(U @ both))
    m.output(m.matrix("V", "O", "H") @ hb, loss=sse)
    with pytest.raises(DefinitionError, match="'both' reads both forward") as e:
        derive(m)
    assert e.value.location.endswith(f":{line}")


def test_the_readout_reads_both_directions():
    D = derive(bielman())
    assert [s.reverse for s in D.states] == [False, True]
    loop = {n.name: n.reverse for n in D.nodes if n.phase == "loop"}
    assert loop == {"U_f_hf_prev": False, "hf": False, "U_b_hb_prev": True, "hb": True}
    assert {n.name for n in D.nodes if n.phase == "post"} >= {"z"}


def test_reverse_must_be_a_bool():
    m = Model("bad", sizes=("I", "H", "O"))
    with pytest.raises(DefinitionError, match="reverse must be True or False"):
        m.state("h", "H", reverse="yes")


def test_the_reverse_state_runs_from_the_last_step_down():
    """y_0 depends on x_{T-1} (through hb) and y_{T-1} on x_0 (through hf); hb's state0
    enters at t = T-1 and its final state is the one at t = 0."""
    D = derive(bielman())
    sizes = tiny_sizes(D)
    params, x, _, state0 = random_problem(D, sizes, T=4, B=2)
    y, final = reference.forward(D, params, x, state0)
    x2 = x.copy()
    x2[-1] += 1.0
    y2, _ = reference.forward(D, params, x2, state0)
    assert np.abs(y2[0] - y[0]).max() > 1e-3
    s2 = dict(state0, hb=state0["hb"] + 1.0)
    y3, final3 = reference.forward(D, params, x, s2)
    assert np.abs(y3[-1] - y[-1]).max() > 1e-3  # hb's state0 is read at the last step
    np.testing.assert_allclose(final3["hf"], final["hf"])
    trajectory, _ = reference._run_forward(D, params, x, state0)
    np.testing.assert_allclose(final["hb"], trajectory[0]["hb"])
    np.testing.assert_allclose(final["hf"], trajectory[-1]["hf"])


def test_a_reverse_lstm_like_cell_equals_the_unrolled_derivative():
    """A reverse state with a second state and a gate (the cell reads c at t): the
    derived recurrence against the unrolled loss, beyond the built-in's Elman cell."""
    m = Model("rcell", sizes=("I", "H", "O"))
    x = m.input("x", "I")
    h = m.state("h", "H", reverse=True)
    c = m.state("c", "H", reverse=True)
    g = m.node("g", tanh(m.matrix("W", "H", "I") @ x + m.matrix("U", "H", "H") @ h.prev))
    m.update(c, 0.5 * c.prev + g)
    m.update(h, tanh(c) * g)
    hf = m.state("hf", "H")
    m.update(hf, tanh(m.matrix("Wf", "H", "I") @ x + m.matrix("Uf", "H", "H") @ hf.prev))
    m.output(m.matrix("V", "O", "H") @ h + m.matrix("Vf", "O", "H") @ hf, loss=sse)
    D = derive(m)
    sizes = tiny_sizes(D, 2)
    params, x, targets, state0 = random_problem(D, sizes, T=3, B=1)
    loss, grads = reference.loss_and_grads(D, params, x, targets, state0=state0)
    sym_loss, sym_grads = symbolic_loss_and_grads(m, sizes, params, x, targets, state0)
    assert abs(loss - sym_loss) <= 1e-12 * abs(sym_loss)
    for name in params:
        assert np.any(sym_grads[name] != 0), name
        assert max_relative_error(grads[name], sym_grads[name]) < 1e-12, name


# -- the generated modules -----------------------------------------------------------
REFUSED = [("tbptt", dict(k1=2, k2=3)), ("artbp", dict(c=0.3, seed=1)), ("rtrl", {}),
           ("checkpoint", dict(segment=2))]


@pytest.fixture(scope="module")
def problem():
    from bpttgen.generated import bielman as module

    D = derive(bielman())
    params, x, targets, state0 = random_problem(D, tiny_sizes(D), T=5, B=2, seed=3)
    return module, D, (params, x, targets, state0)


def test_the_generated_module_runs_the_reverse_state_backwards(problem):
    """Predictions and final states against the reference: hb's state0 enters at the
    last step and its final state is the one at t = 0."""
    module, D, (params, x, targets, state0) = problem
    y, final = module.forward(params, x, state0=state0)
    y_ref, final_ref = reference.forward(D, params, x, state0)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-15)
    for s in final_ref:
        np.testing.assert_allclose(final[s], final_ref[s], rtol=1e-12, atol=1e-15)
    assert set(module.ALGORITHMS) == {"bptt", "naive", "epochwise"}
    assert not hasattr(module, "_rtrl")  # no forward-mode kernel that could never run


@pytest.mark.parametrize("algorithm, kw", REFUSED)
def test_online_and_checkpointed_algorithms_are_refused_with_the_reason(problem, algorithm, kw):
    module, _, (params, x, targets, state0) = problem
    why = rf"algorithm='{algorithm}' cannot train bielman: its state\(s\) \['hb'\] run in reverse"
    with pytest.raises(ValueError, match=why):
        module.loss_and_grads(params, x, targets, state0=state0, algorithm=algorithm, **kw)
    with pytest.raises(ValueError, match=why):
        module.memory({"I": 3, "H": 4, "O": 3}, 5, 2, algorithm=algorithm)
    with pytest.raises(ValueError, match=why):
        module.Trainer({"I": 3, "H": 4, "O": 3}, algorithm=algorithm, **kw)


def test_rtrl_itself_and_the_cuda_module_refuse(problem):
    module, _, (params, x, targets, state0) = problem
    with pytest.raises(ValueError, match="rtrl learns online, forward in time"):
        module.rtrl(params, x, targets, state0=state0)
    from bpttgen.generated import bielman_cuda

    assert set(bielman_cuda.ALGORITHMS) == {"bptt", "naive", "epochwise"}
    with pytest.raises(ValueError, match="checkpoint recomputes the trajectory forward"):
        bielman_cuda.loss_and_grads(params, x, targets, algorithm="checkpoint")


def test_the_command_line_says_why(capsys):
    from bpttgen.codegen.app import cli

    rc = cli.main(["train", "bielman", "--task", "parity", "--seq-len", "4", "--samples",
                   "8", "--hidden", "2", "--epochs", "1", "--algorithm", "tbptt", "--k1", "2",
                   "--k2", "2"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_USAGE
    assert "algorithm='tbptt' cannot train bielman" in err and "run in reverse" in err


def test_naive_and_bptt_agree_with_the_reference(problem):
    """naive propagates each step's error alone, through earlier steps for hf and
    later ones for hb (calls.reverse_windows): the same gradient as bptt and the
    reference, with a mask and L2."""
    module, D, (params, x, targets, state0) = problem
    mask = np.ones(x.shape[:2])
    mask[1, 0] = 0
    kw = dict(state0=state0, mask=mask, l2=0.05)
    loss, want = reference.loss_and_grads(D, params, x, targets, **kw)
    for algorithm in ("bptt", "naive"):
        got_loss, got = module.loss_and_grads(params, x, targets, algorithm=algorithm, **kw)
        assert got_loss == pytest.approx(loss, rel=1e-12)
        for name in want:
            assert max_relative_error(got[name], want[name]) < 1e-10, (algorithm, name)


def test_the_readme_bidirectional_cell_equals_the_unrolled_derivative():
    """The README's bidirectional cell derives, with a reverse state, and its gradients
    are the unrolled loss's (B = 1, T = 3)."""
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md")) as f:
        source = re.search(r"<!-- readme-test: cell_bi.py -->\n```python\n(.*?)```",
                           f.read(), re.S).group(1)
    namespace = {}
    exec(compile(source, "README.md", "exec"), namespace)
    m = namespace["model"]()
    D = derive(m)
    assert [s.reverse for s in D.states] == [False, True]
    sizes = tiny_sizes(D, 2)
    params, x, targets, state0 = random_problem(D, sizes, T=3, B=1, seed=5)
    loss, grads = reference.loss_and_grads(D, params, x, targets, state0=state0)
    sym_loss, sym_grads = symbolic_loss_and_grads(m, sizes, params, x, targets, state0)
    assert abs(loss - sym_loss) <= 1e-12 * abs(sym_loss)
    for name in params:
        assert max_relative_error(grads[name], sym_grads[name]) < 1e-12, name
