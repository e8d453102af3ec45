"""The scalar functions generated kernels call, in both precisions."""

import math

import numpy as np
import pytest
from numba import njit

from bpttgen.codegen.runtime import kernel_functions as runtime


def _over_array(fn, **options):
    """A kernel applying the scalar function fn to every element."""
    @njit(**options)
    def apply(xs):
        out = np.empty_like(xs)
        for i in range(xs.size):
            out[i] = fn(xs[i])
        return out

    return apply


_tanh_all = _over_array(runtime.tanh)
_sigmoid_all = _over_array(runtime.sigmoid)
# With the kernels' fastmath flags: they may reorder the exp's arithmetic.
_exp_all = _over_array(runtime.exp, **runtime.JIT_OPTIONS)


XS = np.concatenate([np.linspace(-20, 20, 4001), [-1e30, -100.0, 0.0, 1e-6, 100.0, 1e30]])


def test_tanh_float64_is_libm_tanh():
    # math.tanh (libm) and NumPy's SIMD tanh may differ in the last bits.
    np.testing.assert_array_max_ulp(_tanh_all(XS), np.tanh(XS), maxulp=2)


def test_tanh_float32_within_a_few_ulp():
    xs = XS.astype(np.float32)
    err = np.abs(_tanh_all(xs).astype(np.float64) - np.tanh(xs.astype(np.float64)))
    assert err.max() < 4 * np.finfo(np.float32).eps
    assert _tanh_all(xs).dtype == np.float32


def test_exp_float64_is_libm_exp():
    xs = np.linspace(-700, 700, 20001)
    assert np.array_equal(_exp_all(xs), [math.exp(x) for x in xs])


def test_exp_float32_within_a_few_ulp_over_the_normal_range():
    # Every float32 whose exp is a normal float32, on a grid, and both ends.
    xs = np.concatenate([np.linspace(-87.33, 88.72, 2_000_001),
                         [-87.3365, 88.7228, 0.0, 1e-7, -1e-7]]).astype(np.float32)
    got = _exp_all(xs)
    exact = np.exp(xs.astype(np.float64))
    assert got.dtype == np.float32
    assert (np.abs(got - exact) / exact).max() < 4 * np.finfo(np.float32).eps


def test_exp_float32_edges_match_libm():
    # Overflow is inf, below the normal range 0 (no denormals), NaN propagates:
    # a diverging run must still be seen as one.
    xs = np.array([88.73, 1e30, np.inf, -87.4, -1e30, -np.inf], np.float32)
    assert _exp_all(xs).tolist() == [np.inf, np.inf, np.inf, 0.0, 0.0, 0.0]
    assert np.isnan(_exp_all(np.array([np.nan], np.float32))[0])


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-15), (np.float32, 4e-7)])
def test_sigmoid(dtype, tol):
    xs = XS.astype(dtype)
    exact = 1 / (1 + np.exp(-xs.astype(np.float64)))
    got = _sigmoid_all(xs)
    assert np.all(np.isfinite(got))
    assert np.abs(got - exact).max() < tol


def test_python_fallbacks_agree():
    """With NUMBA_DISABLE_JIT the plain Python definitions run."""
    for x in (-3.0, 0.0, 2.5):
        assert runtime.tanh(x) == math.tanh(x)
        assert runtime.exp(x) == math.exp(x)
        assert runtime.sigmoid(x) == pytest.approx(1 / (1 + math.exp(-x)), rel=1e-15)
