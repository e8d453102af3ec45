"""Scalar functions and options of generated kernels.

Generated modules inline these into their kernels, so Numba's cache of a
generated module holds their compiled code; Numba does not notice when this file
changes. Each generated module therefore records ``fingerprint()`` (a hash of this
file) in its text: editing this file changes every regenerated module, which
invalidates their caches, and a module generated against an older version warns.
"""

import hashlib
import math
import warnings

import numpy as np
from numba import njit, types
from numba.core.errors import NumbaIRAssumptionWarning
from numba.extending import intrinsic, overload

# Numba's IR check misreads the variables of an inline="always" overload's lambda
# ("variable '_tanh_overload__locals___lambda__...' is not in scope") and asks for
# a bug report at every compile; the compiled code is unaffected (tests compare
# every kernel with the NumPy reference), so only that message is silenced.
warnings.filterwarnings("ignore", category=NumbaIRAssumptionWarning,
                        message=r"(?s).*_(tanh|sigmoid|exp)_overload__locals")

_SCALAR = dict(cache=True, inline="always")

#: Options of every generated kernel. error_model="numpy": no ZeroDivisionError
#: checks, which block vectorisation. fastmath without nnan/ninf, so NaN and Inf
#: still propagate and a diverging run is detected. nogil: the threads of a call split
#: over its batch (split.py) run their kernels at once.
JIT_OPTIONS = dict(cache=True, nogil=True, error_model="numpy",
                   fastmath={"nsz", "arcp", "contract", "afn", "reassoc"})
#: Options of a module's phase kernels (forward loop, loss, backward loop, ...): Numba
#: inlines them into their caller, the module's one entry point _run, so they are typed,
#: lowered and optimised once there, not again as functions of their own (the run time
#: calls no phase from Python). A bptt call's first compile took 8.6 s for the LSTM
#: as 11 functions nested in each other, 4.5 s as one.
PHASE_OPTIONS = dict(JIT_OPTIONS, inline="always")


def tanh(x):
    """tanh; in float32 kernels a clamped rational approximation (below)."""
    return math.tanh(x)


def exp(x):
    """exp; in float32 kernels a polynomial with exact range reduction (below)."""
    return math.exp(x)


# The formulas below make their constants in their argument's type (type(x)(1.0)):
# compiled for a float32 argument they compute in float32. A GPU kernel calls them as
# they are (runtime/cuda.py): with Python floats, a float32 GPU kernel computed them
# in float64, which a consumer GPU runs at 1/32 to 1/64 of its float32 rate.
def sigmoid(x):
    """The logistic function; float32 CPU kernels use 0.5 + 0.5 tanh(x / 2)."""
    one = type(x)(1.0)
    # Two branches keep exp's argument <= 0: no overflow for large |x|.
    if x >= 0:
        return one / (one + math.exp(-x))
    e = math.exp(x)
    return e / (one + e)


# The float32 tanh of Eigen and XLA: odd rational function of x, exact to a few
# ulp on the clamped range. Unlike a call to math.tanh it inlines and vectorises:
# the fused elementwise loops run several times faster (DESIGN.md, performance).
_TANH_CLAMP = 7.90531110763549805
_A = (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05,
      5.12229709037114e-08, -8.60467152213735e-11, 2.00018790482477e-13,
      -2.76076847742355e-16)
_B = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04,
      1.19825839466702e-06)


@njit(**_SCALAR)
def _tanh_f32(x):
    x = min(max(x, np.float32(-_TANH_CLAMP)), np.float32(_TANH_CLAMP))
    x2 = x * x
    p = np.float32(_A[6])
    for c in (_A[5], _A[4], _A[3], _A[2], _A[1], _A[0]):
        p = p * x2 + np.float32(c)
    q = np.float32(_B[3])
    for c in (_B[2], _B[1], _B[0]):
        q = q * x2 + np.float32(c)
    return x * p / q


# The float32 exp of Cephes (expf.c), as Eigen and XLA vectorise it: x = n ln2 + r
# with |r| <= ln2/2 (ln2 split in two parts so n ln2 is exact), exp(r) by a degree-6
# polynomial, 2^n built in the exponent bits. Max error ~2 ulp (tests/test_runtime).
# A call to math.exp stays a scalar libm call; this inlines and vectorises.
_EXP_HI = 88.72283935546875  # above: inf, as math.exp
_EXP_LO = -87.33654022216797  # below: 0 (2^n would leave the normal range)
_LOG2E = 1.44269504088896341
_LN2_HI = 0.693359375
_LN2_LO = -2.12194440e-4
_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
      1.6666665459e-1, 5.0000001201e-1)


def _bitcast(source, target):
    """An intrinsic reinterpreting the bits of a ``source`` scalar as ``target``."""
    @intrinsic
    def cast(typingctx, x):
        if x != source:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(target))

        return target(source), codegen

    return cast


_f32_from_bits = _bitcast(types.int32, types.float32)  # int32 bits -> float32
_f32_bits = _bitcast(types.float32, types.int32)  # float32 -> its int32 bits


@njit(**_SCALAR)
def _exp_f32(x):
    xc = min(max(x, np.float32(_EXP_LO)), np.float32(_EXP_HI))
    n = np.floor(xc * np.float32(_LOG2E) + np.float32(0.5))  # float: int32 below
    r = xc - n * np.float32(_LN2_HI) - n * np.float32(_LN2_LO)
    p = np.float32(_P[0])
    for c in _P[1:]:
        p = p * r + np.float32(c)
    p = p * r * r + r + np.float32(1.0)
    # p 2^n by adding n to p's exponent bits: exact, and no 2^n that could
    # overflow on its own (n reaches 128; fastmath may reorder products).
    y = _f32_from_bits(np.int32(_f32_bits(p) + (np.int32(n) << 23)))
    if x > np.float32(_EXP_HI):
        y = np.float32(np.inf)
    if x < np.float32(_EXP_LO):
        y = np.float32(0.0)
    if x != x:  # NaN in, NaN out (the clamp above would hide it)
        y = x
    return y


#: float64 kernels' sigmoid: the formula above, compiled.
_sigmoid_f64 = njit(**_SCALAR)(sigmoid)


@overload(tanh, inline="always")
def _tanh_overload(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda x: _tanh_f32(x)
    return lambda x: math.tanh(x)


@overload(exp, inline="always")
def _exp_overload(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda x: _exp_f32(x)
    return lambda x: math.exp(x)


@overload(sigmoid, inline="always")
def _sigmoid_overload(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda x: np.float32(0.5) + np.float32(0.5) * _tanh_f32(np.float32(0.5) * x)
    return lambda x: _sigmoid_f64(x)


def softplus(x):
    """log(1 + e^x), without overflow."""
    return max(x, type(x)(0.0)) + math.log1p(math.exp(-abs(x)))


def relu(x):
    return max(x, type(x)(0.0))


def step(x):
    """The derivative of relu: 1 where x > 0, else 0."""
    return type(x)(1.0) if x > 0 else type(x)(0.0)


# The CPU kernels compile these three as they are, in their argument's type (a
# float64 zero would widen every value computed from them, and a tanh or exp of it
# would leave its float32 version).
def _as_written(function):
    def implementation(x):
        return function
    return implementation


for _function in (softplus, relu, step):
    overload(_function, inline="always")(_as_written(_function))


def fingerprint():
    """First 16 hex digits of the sha256 of this file."""
    with open(__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]
