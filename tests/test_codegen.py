"""Tiers 2 and 3 for the generated CPU modules, parametrised over the registry.

Every case (model x loss) is checked: gradients against float64 central finite
differences, against the NumPy reference, and the equalities theory promises
between algorithms (bptt == naive == tbptt(T, T) == epochwise).
"""

import re

import numba
import numpy as np
import pytest

from bpttgen.codegen.runtime.kernel_functions import JIT_OPTIONS
from bpttgen.derive import derive, reference
from helpers import (CASES, GENERATED_CASES, finite_difference, max_relative_error,
                     random_problem, skip_refused, tbptt_reference, tiny_sizes)

# The float32 kernels differ from the float64 ones only in the scalar functions they
# inline (kernel_functions.py: tanh, sigmoid, exp): the Elman net's tanh and the LSTM's
# sigmoid and tanh cover them (each model costs a compilation, ~20 s cold).
FLOAT32_CASES = ("elman", "lstm")
ALGORITHMS_EQUAL_TO_BPTT = [("naive", {}), ("epochwise", {}), ("tbptt", "T,T"), ("tbptt", "1,T")]


@pytest.fixture(scope="module")
def problem(case_module):
    case, module, derivation = case_module
    sizes = tiny_sizes(derivation, 3)
    return module, derivation, random_problem(derivation, sizes, T=5, B=2, seed=1)


@pytest.fixture(params=sorted(GENERATED_CASES), scope="module")
def case_module(request, generated_module):
    return request.param, generated_module(request.param), derive(CASES[request.param]())


def test_matches_reference(problem):
    module, D, (params, x, targets, state0) = problem
    loss, grads = module.loss_and_grads(params, x, targets, state0=state0)
    ref_loss, ref = reference.loss_and_grads(D, params, x, targets, state0=state0)
    assert abs(loss - ref_loss) <= 1e-12 * max(1.0, abs(ref_loss))
    for name in ref:
        assert max_relative_error(grads[name], ref[name]) < 1e-10, name


def test_finite_differences(problem):
    module, D, (params, x, targets, state0) = problem
    mask = np.array([[1, 1], [0, 1], [1, 0], [1, 1], [0.5, 1]])
    kw = dict(state0=state0, mask=mask, l2=0.05)
    _, grads = module.loss_and_grads(params, x, targets, **kw)
    fd = finite_difference(lambda p: module.loss_and_grads(p, x, targets, **kw)[0], params)
    for name in params:
        assert max_relative_error(grads[name], fd[name]) < 1e-6, name


@pytest.mark.parametrize("algorithm,k", ALGORITHMS_EQUAL_TO_BPTT)
def test_algorithms_agree_with_bptt(problem, algorithm, k):
    module, D, (params, x, targets, state0) = problem
    skip_refused(module, algorithm)
    T = x.shape[0]
    kw = {}
    if k:
        k1, k2 = (T if v == "T" else int(v) for v in k.split(","))
        kw = dict(k1=k1, k2=k2)
    loss, bptt = module.loss_and_grads(params, x, targets, state0=state0)
    loss2, other = module.loss_and_grads(params, x, targets, state0=state0,
                                         algorithm=algorithm, **kw)
    assert loss2 == pytest.approx(loss, rel=1e-12)
    for name in bptt:
        assert max_relative_error(other[name], bptt[name]) < 1e-10, name


def test_tbptt_is_sum_of_truncated_windows(problem):
    """tbptt(k1=2, k2=3) against its definition, evaluated with the reference:
    each window's losses, differentiated with the state before the window fixed."""
    module, D, (params, x, targets, state0) = problem
    skip_refused(module, "tbptt")
    _, grads = module.loss_and_grads(params, x, targets, state0=state0, algorithm="tbptt",
                                     k1=2, k2=3)
    assert x.shape[0] == 5  # windows [0, 1], [1, 3], [2, 4]: they overlap
    expected = tbptt_reference(D, params, x, targets, state0, 2, 3)
    for name in grads:
        assert max_relative_error(grads[name], expected[name]) < 1e-10, name


def test_tbptt_truncation_changes_the_gradient(problem):
    """A truncated gradient must differ from the full one (else truncation is a no-op)."""
    module, D, (params, x, targets, state0) = problem
    skip_refused(module, "tbptt")
    _, full = module.loss_and_grads(params, x, targets, state0=state0)
    _, trunc = module.loss_and_grads(params, x, targets, state0=state0, algorithm="tbptt",
                                     k1=1, k2=1)
    recurrent = [p.name for p in D.params if p.kind == "matrix"]
    assert max(max_relative_error(full[n], trunc[n]) for n in recurrent) > 1e-3


def test_inputs_not_mutated(problem):
    module, D, (params, x, targets, state0) = problem
    copies = [{k: v.copy() for k, v in params.items()}, x.copy(), targets.copy(),
              {k: v.copy() for k, v in state0.items()}]
    # windows copy adjoints: tbptt's, or naive's where a reverse state refuses tbptt
    windows = dict(algorithm="tbptt", k1=2, k2=3) if "tbptt" in module.ALGORITHMS else \
        dict(algorithm="naive")
    module.loss_and_grads(params, x, targets, state0=state0, **windows)
    module.forward(params, x, state0=state0)
    for k in params:
        np.testing.assert_array_equal(params[k], copies[0][k])
    np.testing.assert_array_equal(x, copies[1])
    np.testing.assert_array_equal(targets, copies[2])
    for k in state0:
        np.testing.assert_array_equal(state0[k], copies[3][k])


def test_float32_close_to_float64(problem):
    module, D, (params, x, targets, state0) = problem
    if module.NAME not in FLOAT32_CASES:
        pytest.skip("float32 kernels are compiled for one model of each kind (compile time)")
    loss64, g64 = module.loss_and_grads(params, x, targets, state0=state0)
    f32 = lambda a: a.astype(np.float32) if a.dtype == np.float64 else a  # noqa: E731
    loss32, g32 = module.loss_and_grads({k: f32(v) for k, v in params.items()}, f32(x),
                                        f32(targets), state0={k: f32(v) for k, v in
                                                              state0.items()})
    assert loss32 == pytest.approx(loss64, rel=1e-4)
    for name in g64:
        assert g32[name].dtype == np.float32
        assert max_relative_error(g32[name], g64[name]) < 2e-3, name
    # Computed in float32: no double arithmetic in a float32 time loop (a bare 1.0 or
    # a size H in a kernel line would widen what follows, and a tanh or exp of a double
    # leaves its vectorised float32 version: LayerNorm LSTM's loop ran 2.3x slower).
    # Compiled again without the cache: a kernel loaded from it has no IR to read.
    args = next(s for s in module._run.signatures if "float32" in str(s))[-1]  # _args
    for name, signature in (("_forward_loop", (args,)),
                            ("_backward_loop", (numba.int64, numba.int64, args))):
        kernel = getattr(module, name)
        fresh = numba.njit(**{k: v for k, v in JIT_OPTIONS.items() if k != "cache"})(
            kernel.py_func)
        fresh.compile(signature)
        wide = re.findall(r"= f(?:add|sub|mul|div)[a-z ]* double .*",
                          fresh.inspect_llvm(signature))
        assert not wide, (name, wide[:3])


def test_forward_matches_reference(problem):
    module, D, (params, x, targets, state0) = problem
    y, final = module.forward(params, x, state0=state0)
    ry, rfinal = reference.forward(D, params, x, state0=state0)
    np.testing.assert_allclose(y, ry, rtol=1e-12, atol=1e-14)
    for k in rfinal:
        np.testing.assert_allclose(final[k], rfinal[k], rtol=1e-12, atol=1e-14)


def test_loss_is_the_loss_of_loss_and_grads(problem):
    """loss() runs the forward and the loss phase only: the same number, bit for bit,
    with a mask, initial states and L2 (every case: each loss kernel)."""
    module, D, (params, x, targets, state0) = problem
    kw = dict(state0=state0, mask=np.array([[1, 1], [0, 1], [1, 0], [1, 1], [0.5, 1]]),
              l2=0.05)
    assert module.loss(params, x, targets, threads=1, **kw) == \
        module.loss_and_grads(params, x, targets, threads=1, **kw)[0]
    with pytest.raises(ValueError, match="mask selects no loss term"):
        module.loss(params, x, targets, mask=np.zeros((5, 2)))


def test_every_algorithm_calls_one_compiled_entry_point():
    """Each algorithm but RTRL runs as calls of the module's _run with the bits of the
    phases it needs; all of them, forward() and targets of another integer type
    included, share _run's one compiled signature per float type (a second one would
    compile the whole module again: seconds)."""
    from bpttgen.generated import elman as module
    rng = np.random.default_rng(3)
    T, B, sizes = 6, 2, {"I": 3, "H": 4, "O": 3}
    params = module.init_params(sizes, dtype=np.float64)
    x = rng.standard_normal((T, B, 3))
    targets = rng.integers(0, 3, (T, B))
    mask = np.ones((T, B))
    before = {str(s) for s in module._run.signatures}
    losses = []
    for t in (targets, targets.astype(np.int32)):
        for algorithm, extra in (("bptt", {}), ("naive", {}), ("tbptt", dict(k1=2, k2=3)),
                                 ("epochwise", {}), ("artbp", dict(c=0.3, seed=1)),
                                 ("checkpoint", dict(segment=2, snapshots=1))):
            losses.append(module.loss_and_grads(params, x, t, algorithm=algorithm, mask=mask,
                                                **extra)[0])
        module.forward(params, x)
    new = {str(s) for s in module._run.signatures} - before
    float64 = [s for s in module._run.signatures if s[4].dtype == numba.float64]  # weights
    assert len(float64) == 1, float64
    assert len(new) <= 1
    assert losses[:6] == losses[6:]  # int32 targets: the same numbers


def test_small_and_large_weights_take_the_same_product(monkeypatch):
    """A time loop's product x_t W^T runs on W's transposed copy where W is small
    (calls.SMALL_WEIGHTS) and on W^T itself where it is not: both branches of every
    loop product give the same loss and gradients (float64, to rounding)."""
    from bpttgen.codegen.runtime import calls
    from bpttgen.generated import gru as module
    rng = np.random.default_rng(5)
    T, B, sizes = 5, 3, {"I": 3, "H": 4, "O": 3}
    params = {k: rng.standard_normal(v.shape) * 0.5
              for k, v in module.init_params(sizes, dtype=np.float64).items()}
    x, targets = rng.standard_normal((T, B, 3)), rng.integers(0, 3, (T, B))
    small = module.loss_and_grads(params, x, targets, algorithm="tbptt", k1=2, k2=3)
    monkeypatch.setattr(calls, "SMALL_WEIGHTS", 0)
    large = module.loss_and_grads(params, x, targets, algorithm="tbptt", k1=2, k2=3)
    assert large[0] == pytest.approx(small[0], rel=1e-14)
    for name in small[1]:
        assert max_relative_error(large[1][name], small[1][name]) < 1e-13, name
