"""The code printer against SymPy's own meaning of an expression.

The property test draws random expressions from everything a model definition may
use, prints each with ``pycode`` (and ``pycode_factor`` inside a product and as a
divisor), runs the text in float64 with the scalar helpers the generated modules
import, and compares with the SymPy tree evaluated in 60-digit mpmath, which a
second property test holds against ``sympy.lambdify`` (SymPy's NumPy printer).
Explicit regressions follow (the shrunk cases), and they also run under
``numba.njit`` with the generated kernels' options.
"""

import math

import mpmath
import numba
import numpy as np
import pytest
import sympy as sp
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from bpttgen.codegen.runtime import kernel_functions
from bpttgen.codegen.printer import pycode, pycode_factor
from bpttgen.derive.functions import numpy_implementations, relu, sigmoid, softplus, step

X, Y, Z = sp.symbols("x y z", real=True)
P = sp.Symbol("p", positive=True)
SYMBOLS = (X, Y, Z, P)

#: What a generated module imports besides math (codegen/kernel_functions.py); in
#: Python they are plain float64 functions (tanh, exp, sigmoid) or njit dispatchers.
# _T: the kernel's float type, which a generated kernel binds (float64 here)
NAMESPACE = {"math": math, "_T": float, **{f: getattr(kernel_functions, f) for f in
                                           ("exp", "relu", "sigmoid", "softplus", "step",
                                            "tanh")}}

U = 2.0 ** -53  # unit roundoff of float64
MAGNITUDE = (1e-200, 1e30)  # nonzero values of every subexpression stay in here
# derive's step is (x > 0).astype(...), which a Python bool (step of a constant,
# as lambdify passes it) lacks.
REFERENCE = {**numpy_implementations(),
             "step": lambda x: np.where(np.greater(x, 0), 1.0, 0.0)}


class cube(sp.Function):
    """A user's function with a power as its definition (a product when printed)."""

    definition = staticmethod(lambda x: x**3)


class swish(sp.Function):
    """A user's function whose definition is a product (tests/data/latex_cell.py)."""

    definition = staticmethod(lambda x: x * sigmoid(x))


class shifted(sp.Function):
    """A user's function whose definition is a sum."""

    definition = staticmethod(lambda x: x - sp.Rational(1, 2))


USER_FUNCTIONS = (cube, swish, shifted)
#: sympy.lambdify's modules: NumPy, derive's NumPy functions, the user functions'
#: definitions lambdified in turn.
LAMBDIFY_MODULES = [REFERENCE, {
    f.__name__: sp.lambdify([X], f.definition(X), modules=[REFERENCE, "numpy"])
    for f in USER_FUNCTIONS}, "numpy"]


# -- the reference -----------------------------------------------------------------

class _Outside(Exception):
    """The point is outside the domain the comparison is made on."""


def reference(expr, point):
    """(value, bound) of expr at point: its value in 60-digit mpmath, and a first-
    order bound, in units of U, on the absolute error of any float64 evaluation of
    the same operations in any order (each sum, product, quotient and power rounds
    once per operation; math functions to a few ulp; errors of the arguments
    propagate through the derivative). Raises _Outside off the domain."""
    with mpmath.workdps(60):
        return _walk(expr, {s: mpmath.mpf(v) for s, v in point.items()})


def _walk(e, point):
    v, b = _node(e, point)
    if not mpmath.isfinite(v) or (v != 0 and not MAGNITUDE[0] < abs(v) < MAGNITUDE[1]):
        raise _Outside
    return v, b


def _node(e, point):
    if e.has(sp.zoo, sp.nan, sp.oo, -sp.oo, sp.I):
        raise _Outside  # SymPy evaluated a division by 0 while building e
    if e.is_Symbol:
        return point[e], 0
    if e.is_Integer:
        return mpmath.mpf(int(e)), 0
    if e.is_Rational:  # printed p.0/q.0: one rounding
        v = mpmath.mpf(e.p) / e.q
        return v, abs(v)
    if e.is_Float:  # printed as the double it holds
        return mpmath.mpf(float(e)), 0
    if e.is_NumberSymbol:
        v = mpmath.mpf(e.evalf(60))
        return v, abs(v)
    if type(e) in USER_FUNCTIONS:
        return _walk(type(e).definition(*e.args), point)
    args = [_walk(a, point) for a in e.args]
    vs = [v for v, _ in args]
    if isinstance(e, (sp.Max, sp.Min)):  # continuous: at a kink, moved by <= the error
        return (max if isinstance(e, sp.Max) else min)(vs), max(b for _, b in args)
    if e.is_Add:
        v = mpmath.fsum(vs)
        return v, sum(b for _, b in args) + (len(vs) - 1) * sum(abs(x) for x in vs)
    if e.is_Mul:
        v = mpmath.fprod(vs)
        return v, (len(vs) - 1) * abs(v) + sum(
            b * abs(mpmath.fprod(vs[:i] + vs[i + 1:])) for i, (_, b) in enumerate(args))
    if e.is_Pow:
        (base, bb), (n, bn) = args
        if base == 0 and n < 0:
            raise _Outside
        if not e.exp.is_Integer and base <= 0:
            raise _Outside  # drawn only over positive bases
        v = base ** n
        # b**n as |n| products (or pow, or a reciprocal of them); a non-integer
        # exponent printed p.0/q.0 is itself off by U|n| (bn = |n|), which moves
        # b**n by U|n ln b||b**n|.
        if e.exp.is_Rational and not e.exp.is_Integer:
            bn = abs(n)
        rounding = abs(n) + 2 + (abs(v * mpmath.log(base)) * bn if bn else 0)
        return v, rounding * abs(v) + abs(n * base ** (n - 1)) * bb
    (a, ba), = args
    f = type(e)
    if f is sp.exp:
        v = mpmath.exp(a)
        return v, 2 * abs(v) + abs(v) * ba
    if f is sp.log:
        if a <= 0:
            raise _Outside
        v = mpmath.log(a)
        return v, 2 * abs(v) + ba / a
    if f is sp.tanh:
        v = mpmath.tanh(a)
        return v, 2 * abs(v) + (1 - v * v) * ba
    if f is sigmoid:
        v = 1 / (1 + mpmath.exp(-a))
        return v, 4 * v + v * (1 - v) * ba
    if f is softplus:
        v = mpmath.log1p(mpmath.exp(a))
        return v, 4 * v + ba / (1 + mpmath.exp(-a))
    if f is relu:
        return max(a, 0), ba
    if f is sp.Abs:
        return abs(a), ba
    if f is step:
        if abs(a) <= 16 * U * ba:
            raise _Outside  # the rounded argument may fall on either side of 0
        return mpmath.mpf(1 if a > 0 else 0), 0
    raise AssertionError(f"no reference for {f.__name__}")


def run(text, point):
    """The printed text evaluated in float64 as generated code would."""
    return eval(text, dict(NAMESPACE), {s.name: float(v) for s, v in point.items()})


def check(got, value, bound, *what):
    """got agrees with the reference to 1e-12 relative, or to the rounding bound
    where that is larger (absolute near zero and under cancellation). what: the
    objects that name the case in a failure (formatted only then)."""
    tol = 1e-12 * abs(value) + 8 * U * bound  # 8: slack for second-order terms
    if not abs(got - value) <= tol:
        raise AssertionError(f"{' '.join(map(str, what))}: got {got!r}, reference "
                             f"{float(value)!r} (tolerance {float(tol):.3g})")


# -- the strategy ------------------------------------------------------------------

CONSTANTS = [sp.Integer(n) for n in (1, 2, 3, -1, -2, -4)] + [
    sp.Rational(1, 2), sp.Rational(1, 3), sp.Rational(-1, 2), sp.Rational(3, 2),
    sp.Rational(-5, 7), sp.Float(0.1), sp.Float(-2.5), sp.Float(1 / 3), sp.Float(1e-3),
    sp.pi]
POWERS = (2, 3, 4, -1, -2, -3, -4, 5, -5)
FRACTIONS = (sp.Rational(1, 2), sp.Rational(1, 3), sp.Rational(-1, 2), sp.Rational(3, 2),
             sp.Rational(-3, 2), sp.Rational(2, 3), sp.Float(0.75))
FUNCTIONS = (sp.exp, sp.tanh, sigmoid, softplus, relu, step, sp.Abs, cube, swish, shifted)
#: Expressions > 0 at every point, made from any expression a: the arguments of
#: log and of fractional powers. Each keeps a's scale.
POSITIVE = (lambda a: 1 + a**2, sp.exp, sigmoid, softplus,
            lambda a: sp.Abs(a) + sp.Rational(1, 4))


def _lattice(f, a, b):
    try:
        return f(a, b)
    except ValueError:  # SymPy cannot order a number such as softplus(1)
        return a


def _extend(sub):
    positive = st.one_of(st.just(P),
                         st.builds(lambda f, a: f(a), st.sampled_from(POSITIVE), sub))
    return st.one_of(
        st.builds(lambda f, a: f(a), st.sampled_from(FUNCTIONS), sub),
        st.builds(lambda a: -a, sub),
        st.builds(sp.Add, sub, sub),
        st.builds(lambda a, b: a - b, sub, sub),
        st.builds(sp.Mul, sub, sub),
        st.builds(lambda a, b: a / b, sub, sub),
        st.builds(lambda a, b, n: a / b**n, sub, sub, st.sampled_from((2, 3, -2))),
        st.builds(sp.Pow, sub, st.sampled_from(POWERS)),
        st.builds(sp.Pow, positive, st.sampled_from(FRACTIONS)),
        st.builds(lambda a: sp.log(a), positive),
        st.builds(_lattice, st.sampled_from((sp.Max, sp.Min)), sub, sub))


#: Real expressions over SYMBOLS from everything a model definition may use.
EXPRESSIONS = st.recursive(st.sampled_from(SYMBOLS + tuple(CONSTANTS)), _extend,
                           max_leaves=8)


def points():
    """x, y, z of either sign and p > 0, all bounded away from 0, so that symbols
    (the commonest divisors) never make a quotient ill-conditioned."""
    magnitude = st.floats(0.25, 2.0)
    signed = st.builds(lambda m, s: m if s else -m, magnitude, st.booleans())
    return st.fixed_dictionaries({X: signed, Y: signed, Z: signed,
                                  P: st.floats(0.25, 4.0)})


# -- the property tests ------------------------------------------------------------

#: Deterministic (derandomize, no example database); no explain phase, which on a
#: failure reruns the test thousands of times to annotate the shrunk example.
PROPERTY = dict(deadline=None, derandomize=True, database=None,
                phases=(Phase.explicit, Phase.generate, Phase.shrink),
                suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=1500, **PROPERTY)
@given(expr=EXPRESSIONS, point=points())
def test_printed_code_computes_the_expression(expr, point):
    """pycode(e), and pycode_factor(e) in a product and as a divisor, evaluated in
    float64, equal e at random points.

    The comparison is well conditioned by construction: symbols are bounded away
    from 0 (|x| >= 1/4), log and fractional powers only ever see POSITIVE
    expressions, and a point is skipped (assume) when any subexpression leaves
    [1e-200, 1e30] (overflow, underflow, a zero divisor) or a step function's
    argument is within rounding of 0 (the two sides may then take different
    branches; relu, Abs, Max and Min are continuous, so their kinks need no care).
    Elsewhere the reference carries a bound on the rounding error of any float64
    evaluation order; the tolerance is 1e-12 relative plus 8 times that bound, so
    cancellation never fails the test, while a wrong precedence changes the value
    by about the size of the operands, far above it.
    """
    try:
        value, bound = reference(expr, point)
    except _Outside:
        assume(False)
    factor = pycode_factor(expr)
    cases = [(pycode(expr), value, bound), (f"2.0*{factor}", 2 * value, 2 * bound),
             (f"{factor}*2.0", 2 * value, 2 * bound)]
    if abs(value) > 1e3 * (1e-12 * abs(value) + 8 * U * bound):  # 1/value well conditioned
        inverse_bound = 2 * (bound / value**2 + 1 / abs(value))
        cases.append((f"1.0/{factor}", 1 / value, inverse_bound))
    got = run(f"({', '.join(text for text, _, _ in cases)},)", point)
    for x, (text, v, b) in zip(got, cases):
        check(x, v, b, text, "for", expr)


@settings(max_examples=200, **PROPERTY)
@given(expr=EXPRESSIONS, point=points())
def test_reference_agrees_with_lambdify(expr, point):
    """The reference above against sympy.lambdify (SymPy's NumPy printer, derive's
    NumPy functions) in float64, under the same tolerance: a check of the
    reference and of its error bound, independent of codegen's printer."""
    try:
        value, bound = reference(expr, point)
    except _Outside:
        assume(False)
    f = sp.lambdify(SYMBOLS, expr, modules=LAMBDIFY_MODULES, docstring_limit=0)
    with np.errstate(all="ignore"):
        got = float(f(*(np.float64(point[s]) for s in SYMBOLS)))
    check(got, value, bound, "lambdify of", expr)


# -- regressions -------------------------------------------------------------------

a, b, g, r = sp.symbols("a b g r", real=True)

#: Expressions the old printer got wrong (a/b*b; a user's definition pasted without
#: parentheses: a - 1.0/2.0*math.log(g), 1.0/-1.0/6.0; a Float to 15 digits), and
#: the text now printed.
REGRESSIONS = {
    a / b**2: "a/(b*b)",
    -a / b**2: "-a/(b*b)",
    2 / b**3: "2.0/(b*b*b)",
    -1 / b**4: "-1.0/(b*b*b*b)",
    a / (3 * b**2): "(1.0/3.0)*a/(b*b)",
    -1 / (1 + a)**2: "-1.0/((a + 1.0)*(a + 1.0))",
    a / cube(b): "a/(b*b*b)",
    a / swish(b): "a/(b*sigmoid(b))",
    swish(g)**sp.Rational(1, 3): "(g*sigmoid(g))**(1.0/3.0)",
    2 * shifted(a): "2.0*(a - 1.0/2.0)",
    shifted(a) * sp.log(g): "(a - 1.0/2.0)*math.log(g)",
    shifted(a)**2: "(a - 1.0/2.0)*(a - 1.0/2.0)",
    1 / shifted(sp.Rational(1, 3)): "1.0/(-1.0/2.0 + 1.0/3.0)",
    3 / (4 * cube(sp.Rational(1, 3))): "(3.0/4.0)/((1.0/3.0)*(1.0/3.0)*(1.0/3.0))",
    sp.Float(1 / 3) * a: "0.3333333333333333*a",
}

#: Printed right before, printed differently now: a negative power as a quotient
#: of products, like the same power inside a product; a negative product as its
#: sign and the positive product.
RESTYLED = {
    a**-3: "1.0/(a*a*a)",  # was a**(-3.0)
    (1 + a)**-2: "1.0/((a + 1.0)*(a + 1.0))",  # was (a + 1.0)**(-2.0)
    -a / 3: "-(1.0/3.0)*a",  # was -1.0/3.0*a
}

#: Expressions printed right before; their text must not change.
UNCHANGED = {
    a / b**-2: "a*b*b",
    a / (1 + g * g): "a/(g*g + 1.0)",
    r**2 / (1 + r**2): "r*r/(r*r + 1.0)",
    sp.tanh(a) * (1 - b**2): "(1.0 - b*b)*tanh(a)",
    -b**2: "-b*b",
    2 * a * b**2: "2.0*a*b*b",
    a / (b**2 * g): "a/(b*b*g)",
    1 / a: "1.0/a",
    1 / sp.sqrt(a): "1.0/math.sqrt(a)",
    a**5: "a**5.0",
    a / 3: "(1.0/3.0)*a",
    (1 + a)**2: "(a + 1.0)*(a + 1.0)",
    sp.Max(a, b)**2 / g: "max(a, b)*max(a, b)/g",
    sigmoid(a)**2 * softplus(b) - relu(g) * step(a): (
        "-relu(g)*step(a) + sigmoid(a)*sigmoid(a)*softplus(b)"),
}

#: pycode_factor parenthesizes what prints as a product or quotient.
FACTORS = {b**2: "(b*b)", 1 / b: "(1.0/b)", 1 / sp.sqrt(g): "(1.0/math.sqrt(g))",
           1 - b: "(1.0 - b)", sp.tanh(b): "tanh(b)", b**5: "b**5.0",
           -b: "(-b)", swish(b): "(b*sigmoid(b))"}

POINT = {a: 0.7, b: -1.3, g: 0.4, r: 1.7}


@pytest.mark.parametrize("expr, text", [*REGRESSIONS.items(), *RESTYLED.items(),
                                        *UNCHANGED.items()], ids=str)
def test_printed_text(expr, text):
    """The layout, numbers as Python floats; the kernels' (numbers as _T(...)) the same
    value."""
    assert pycode(expr, typed=False) == text
    value, bound = reference(expr, POINT)
    check(run(text, POINT), value, bound, expr)
    assert run(pycode(expr), POINT) == run(text, POINT)


@pytest.mark.parametrize("expr, text", FACTORS.items(), ids=str)
def test_factor_text(expr, text):
    assert pycode_factor(expr, typed=False) == text
    value, _ = reference(expr, POINT)
    assert run(f"3.0/{text}", POINT) == pytest.approx(float(3 / value), rel=1e-14)


def test_user_function_without_definition_is_an_error():
    from bpttgen.codegen.printer import PrintError

    with pytest.raises(PrintError, match="'mystery'"):
        pycode(sp.Function("mystery")(a) + 1)


# kernel_functions silences this message at import; pytest's per-test filters do not
# keep that (see the comment there).
@pytest.mark.filterwarnings(
    r"ignore:(?s).*_(tanh|sigmoid|exp)_overload__locals"
    ":numba.core.errors.NumbaIRAssumptionWarning")
def test_under_numba():
    """The regression cases compiled with the generated kernels' options (one
    compilation for all: a function returning a tuple)."""
    exprs = [*REGRESSIONS, *RESTYLED, *UNCHANGED]
    names = ", ".join(s.name for s in POINT)
    source = f"def f({names}):\n    return ({', '.join(pycode(e) for e in exprs)},)\n"
    namespace = dict(NAMESPACE)
    exec(source, namespace)
    options = {k: v for k, v in kernel_functions.JIT_OPTIONS.items() if k != "cache"}
    f = numba.njit(**options)(namespace["f"])
    got = f(*POINT.values())
    for e, x in zip(exprs, got):
        value, bound = reference(e, POINT)
        # fastmath (reassoc, contract, afn) may reorder: a few more roundings
        check(x, value, 4 * bound + 4 * abs(value), e)


def test_numbers_take_the_kernels_float_type():
    """Every number a kernel line holds is _T(...): with float32 arguments and _T =
    float32 no value of any regression case is computed in float64 (a bare 1.0 or 2
    would be: Numba types Python numbers as float64 and int64)."""
    assert pycode(2 * a + sp.Rational(1, 3) - sp.pi * sp.E + sp.Float(0.5) * b) == \
        "_T(2)*a + _T(0.5)*b - _T(math.e)*_T(math.pi) + _T(1)/_T(3)"
    exprs = [*REGRESSIONS, *RESTYLED, *UNCHANGED]
    names = ", ".join(s.name for s in POINT)
    source = f"def f({names}):\n    return ({', '.join(pycode(e) for e in exprs)},)\n"
    namespace = dict(NAMESPACE, _T=np.float32)
    exec(source, namespace)
    f = numba.njit(namespace["f"])
    f(*(np.float32(v) for v in POINT.values()))
    returned = f.nopython_signatures[0].return_type
    wide = [str(e) for e, t in zip(exprs, returned) if t != numba.float32]
    assert not wide, f"computed in float64 from float32: {wide}"
