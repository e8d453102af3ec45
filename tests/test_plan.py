"""Layout decisions of codegen/plan.py that the gradient tests cannot see (they would
pass with or without them): shared adjoints and the reuse of work arrays."""

import numpy as np
import pytest

from bpttgen.codegen.plan import Plan
from bpttgen.derive import derive
from bpttgen.derive.models import BUILTIN
from helpers import max_relative_error, random_problem, tbptt_reference, tiny_sizes


def _plan(name, share=True):
    return Plan(derive(BUILTIN[name]()), share=share)


def test_lstm_gates_share_one_adjoint_and_biases_sum_after_the_loop():
    plan = _plan("lstm")
    assert plan.alias == {"P_x": "P_h_prev"}
    assert sorted(p for _, p in plan.bias_sums) == ["b_f", "b_g", "b_i", "b_o", "b_y"]
    loop = [line for b in plan.blocks["loop"] for line in b.backward]
    # No bias accumulates inside the element loop (it kept LLVM from vectorising),
    # each gate's adjoint is stored once, by assignment.
    assert not any(line.lstrip().startswith("d_b_") for line in loop)
    stores = [line for line in loop if line.lstrip().startswith("d_P_")]
    assert len(stores) == 4 and all(" = " in line for line in stores)
    assert "d_P_x_seq" not in {a.name for a in plan.arrays}


def test_gru_keeps_separate_input_adjoint():
    # n = tanh(W_n x + b_in + r*(U_n h_prev + b_hn)): the two products of n have
    # different partials, so the groups cannot share; the input group's adjoint is
    # accumulated (a truncated window may revisit its rows).
    plan = _plan("gru")
    assert plan.alias == {}
    loop = [line for b in plan.blocks["loop"] for line in b.backward]
    assert any("d_P_x_seq[" in line and "+=" in line for line in loop)
    assert ("n", "b_hn") in plan.bias_sums and ("n", "b_in") in plan.bias_sums


def test_without_share_the_layout_is_plain():
    plan = _plan("lstm", share=False)
    assert plan.alias == {} and plan.bias_sums == {} and plan.bias_lines() == []
    loop = [line for b in plan.blocks["loop"] for line in b.backward]
    assert sum(line.lstrip().startswith("d_b_") for line in loop) == 4


def test_softmax_exp_is_computed_once():
    loss = _plan("elman").loss
    assert loss["stored"] is not None
    assert "exp" in loss["stored"] and "exp" not in loss["prediction"]
    assert _plan("elman", share=False).loss["stored"] is None  # the CUDA module's


def test_work_arrays_are_reused_and_results_are_not(generated_module):
    module = generated_module("lstm")
    D = derive(BUILTIN["lstm"]())
    params, x, targets, state0 = random_problem(D, tiny_sizes(D), T=5, B=2, seed=3)
    loss1, grads1 = module.loss_and_grads(params, x, targets, state0=state0)
    kept = {k: v.copy() for k, v in grads1.items()}
    first = module._workspace(tiny_sizes(D), 5, 2, np.float64, params, x, state0)
    second = module._workspace(tiny_sizes(D), 5, 2, np.float64, params, x, state0)
    assert first["d_P_h_prev_seq"] is second["d_P_h_prev_seq"]  # reused ...
    assert not second["delta_h_seq"].any() and not second["delta_c_seq"].any()  # ... zeroed
    # Another problem of the same sizes: the first results stay as they were, and
    # the same problem again gives the same numbers from the reused arrays.
    module.loss_and_grads(params, 2 * x, targets, state0=state0, algorithm="tbptt", k1=2, k2=3)
    for k in kept:
        assert np.array_equal(grads1[k], kept[k]), k
    loss3, grads3 = module.loss_and_grads(params, x, targets, state0=state0)
    assert loss3 == loss1 and all(np.array_equal(grads3[k], kept[k]) for k in kept)
    module.free_workspace()
    third = module._workspace(tiny_sizes(D), 5, 2, np.float64, params, x, state0)
    assert third["d_P_h_prev_seq"] is not second["d_P_h_prev_seq"]


def test_readout_product_uses_the_outputs_adjoint_and_writes_delta_h():
    # z = W_hy h + b_y: the product's adjoint is d_z itself (no copy), and its
    # backward product is the first write to delta_h, so no scratch-and-add.
    plan = _plan("elman")
    assert plan.node_alias == {"P_h": "z"} and plan.direct == {"P_h"}
    post = [line for b in plan.blocks["post"] for line in b.backward]
    assert post == ["np.dot(d_z_seq[_lo:_hi], W_P_h, delta_h_seq[_lo + B:_hi + B])"
                    "  # the first write there " + plan.equation("adj", "h")]
    names = {a.name for a in plan.arrays}
    assert "d_P_h_seq" not in names and "scratch_P_h" not in names
    # Two post products in a chain (seed 004's net): both write their target first.
    assert _plan("deep").direct == {"P_v", "P_s"}
    assert _plan("elman", share=False).direct == set()


def _tricky():
    """Structures the built-ins do not have, for the shared-adjoint decisions: a bias
    in two nodes, a product read by two nodes (not 'single'), a state read at t by
    another state, and an output summing products of two states."""
    from bpttgen.derive import Model, sigmoid, softmax_cross_entropy, tanh

    m = Model("tricky", sizes=("I", "H", "O"))
    x = m.input("x", "I")
    h, c = m.state("h", "H"), m.state("c", "H")
    b = m.bias("b", "H")
    a = m.matrix("W_a", "H", "I") @ x
    g = m.node("g", sigmoid(a + m.matrix("U_g", "H", "H") @ h.prev + b))
    m.update(c, g * c.prev + (1 - g) * tanh(a))
    m.update(h, tanh(m.matrix("W_h", "H", "I") @ x + m.matrix("U_h", "H", "H") @ c + b))
    m.output(m.matrix("W_y", "O", "H") @ h + m.matrix("V_y", "O", "H") @ c
             + m.bias("b_y", "O"), loss=softmax_cross_entropy)
    return m


def test_shared_adjoints_on_unusual_structures_match_the_reference(tmp_path):
    from bpttgen.codegen.generate import generate, import_path
    from bpttgen.derive import reference

    D = derive(_tricky())
    plan = Plan(D, share=True)
    assert "W_a_x" not in plan.single  # read by g and by c's update
    # W_y h and V_y c both have z's adjoint: one group borrows the other's array,
    # which is z's own.
    post = [g for g in plan.groups if g.phase == "post"]
    assert len(post) == 2 and {plan.group_adjoint(g) for g in post} == {"d_z_seq"}
    path, = generate(_tricky(), str(tmp_path), "pytest")
    module = import_path(path, "bpttgen_test_tricky")
    params, x, targets, state0 = random_problem(D, tiny_sizes(D), T=5, B=2, seed=4)
    loss, grads = module.loss_and_grads(params, x, targets, state0=state0)
    ref_loss, ref = reference.loss_and_grads(D, params, x, targets, state0=state0)
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    for k in ref:
        assert max_relative_error(grads[k], ref[k]) < 1e-10, k
    # Overlapping truncated windows revisit rows: the assigned adjoints must not
    # lose what an earlier window wrote where it should accumulate.
    _, grads = module.loss_and_grads(params, x, targets, state0=state0, algorithm="tbptt",
                                     k1=2, k2=3)
    expected = tbptt_reference(D, params, x, targets, state0, 2, 3)
    for k in expected:
        assert max_relative_error(grads[k], expected[k]) < 1e-10, k


def test_lines_cite_the_equations_they_implement():
    # Each elementwise value and adjoint line ends with the number of its equation
    # in the LaTeX derivation (render numbers them in the same order).
    from bpttgen.derive.latex import render

    plan = _plan("lstm")
    text = render(plan.d, form="markdown")
    lines = [line for blocks in plan.blocks.values() for b in blocks
             for line in b.forward + b.backward]
    h = next(line for line in lines if line.strip().startswith("h = "))
    number = h.rsplit("# (", 1)[1].rstrip(")")
    assert f"\\mathbf{{h}}_{{t}} = " in text.split(f"\\tag{{{number}}}")[0].rsplit("$$", 1)[1]
    adjoint = next(line for line in lines if line.strip().startswith("delta_c += "))
    number = adjoint.rsplit("# (", 1)[1].rstrip(")")
    assert "delta}^{c}_{t}" in text.split(f"\\tag{{{number}}}")[0].rsplit("$$", 1)[1]


#: Every algorithm of a CPU module, with the options it needs at T = 5.
ALGORITHMS = {"bptt": {}, "naive": {}, "tbptt": dict(k1=2, k2=3), "epochwise": {},
              "artbp": dict(c=0.3, seed=4), "checkpoint": dict(segment=2), "rtrl": {}}


def _poisoned_equals_fresh(module, params, x, targets, state0, mask):
    """Each algorithm's loss and gradients with every work array the call does not
    zero filled with NaN first (runtime.calls.ArrayCache.poison), against a call on
    fresh arrays: bit for bit, twice (allocated, then reused)."""
    cache = module._MODEL.cache
    for algorithm, kw in ALGORITHMS.items():
        if algorithm not in module.ALGORITHMS:
            continue
        call = (module.rtrl if algorithm == "rtrl" else
                lambda *a, **k: module.loss_and_grads(*a, algorithm=algorithm, threads=1, **k))
        module.free_workspace()
        cache.poison = False
        want = call(params, x, targets, state0=state0, mask=mask, **kw)[:2]
        module.free_workspace()
        cache.poison = True
        try:
            for _ in range(2):
                loss, grads = call(params, x, targets, state0=state0, mask=mask, **kw)[:2]
                assert loss == want[0], algorithm
                for k in want[1]:
                    assert np.array_equal(grads[k], want[1][k]), (algorithm, k)
        finally:
            cache.poison = False
            module.free_workspace()


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_work_arrays_left_unzeroed_are_written_before_they_are_read(generated_module, name):
    """A call zeroes only the adjoints it accumulates into (Plan.overwritten says which
    it writes whole first); the rest, NaN before the call, must not reach a result.
    bench/fuzz.py runs every cell this way too."""
    module = generated_module(name)
    D = derive(BUILTIN[name]())
    params, x, targets, state0 = random_problem(D, tiny_sizes(D), T=5, B=3, seed=5)
    mask = np.random.default_rng(5).random((5, 3))
    mask[2] = 0
    _poisoned_equals_fresh(module, params, x, targets, state0, mask)


def test_the_poisoned_workspace_finds_an_array_that_needed_zeroing(generated_module):
    """The check above can fail: the LSTM's cell-state adjoint is accumulated (+=) from
    the last step down, so without its zeroing the poisoned call's gradients are NaN."""
    module = generated_module("lstm")
    D = derive(BUILTIN["lstm"]())
    params, x, targets, state0 = random_problem(D, tiny_sizes(D), T=5, B=3, seed=5)
    assert "delta_c_seq" in module._MODEL.cache.zeros
    assert "d_P_h_prev_seq" not in module._MODEL.cache.zeros  # the layout's choice
    cache = module._MODEL.cache
    zeros = cache.zeros
    cache.zeros, cache.poison = tuple(z for z in zeros if z != "delta_c_seq"), True
    try:
        _, grads = module.loss_and_grads(params, x, targets, state0=state0, threads=1)
        assert np.isnan(grads["U_f"]).all()
    finally:
        cache.zeros, cache.poison = zeros, False
        module.free_workspace()
