"""SymPy printers for generated Numba code: scalar expressions inside fused loops.

Target differences are tables (``_known_functions_math``), as in SymPy's own
pycode printers. tanh, exp and the functions derive/ adds (sigmoid, softplus, relu,
step) print as calls to the scalar helpers of codegen/kernel_functions.py, which
the generated module imports under the same names (float32 kernels get
vectorisable versions); everything else prints as ``math.*``. A user's own
``sympy.Function`` prints through its ``definition``.
"""

import functools
import math

import sympy as sp
from sympy.core.mul import _keep_coeff
from sympy.printing.precedence import PRECEDENCE, precedence
from sympy.printing.pycode import PythonCodePrinter

from bpttgen.derive.functions import CUSTOM

#: Integer powers printed as products (b*b, b*b*b, b*b*b*b): exact and vectorisable.
PRODUCT_POWERS = (2, 3, 4)


class NumbaPrinter(PythonCodePrinter):
    """Scalar Python for @njit loops: ``math.tanh(a)``, ``sigmoid(a)``, floats.

    Precedence is SymPy's (``precedence``, ``parenthesize``) for what is printed:
    a power written as a product or a quotient (``b*b``, ``1.0/b``,
    ``1.0/math.sqrt(b)``) has a product's precedence, not a power's, and a user's
    function is replaced by its definition before printing, so SymPy sees the
    expression whose text it parenthesizes.
    """

    _kf = dict(PythonCodePrinter._kf)
    _default_settings = dict(PythonCodePrinter._default_settings, typed=True, sizes=())

    def __init__(self, settings=None):
        super().__init__({"fully_qualified_modules": True, "standard": "python3",
                          **(settings or {})})
        for name in CUSTOM:
            self.known_functions[name] = name
        # tanh and exp from codegen/runtime/kernel_functions.py: exact in float64,
        # vectorisable in float32.
        self.known_functions["tanh"] = "tanh"
        self.known_functions["exp"] = "exp"

    def doprint(self, expr, assign_to=None):
        return super().doprint(self.written_out(expr), assign_to)

    def written_out(self, expr):
        """expr with each user's function replaced by its definition (nested ones
        too), so that SymPy's precedence applies to the text actually printed.
        Nothing is evaluated: 2*f(a) with f(x) = x + 1 is 2*(a + 1), as written."""
        with sp.evaluate(False):
            return sp.sympify(expr).replace(
                lambda e: isinstance(e, sp.Function) and self._is_users(e),
                lambda e: self.written_out(_definition(e)))

    def _is_users(self, call):
        name = type(call).__name__
        return not (name in CUSTOM or name in self.known_functions
                    or hasattr(self, f"_print_{name}"))

    def _precedence(self, item):
        """SymPy's precedence of item as this printer writes it: a power printed
        as a product or quotient binds like a product (SymPy's says Pow)."""
        if item.is_Pow and item.is_commutative and (
                _product_power(item) or item.exp is sp.S.NegativeOne
                or -item.exp is sp.S.Half):  # 1.0/b, 1.0/math.sqrt(b) (SymPy's)
            return PRECEDENCE["Mul"]
        return precedence(item)

    def parenthesize(self, item, level, strict=False):
        """StrPrinter.parenthesize with this printer's precedence."""
        p = self._precedence(item)
        if p < level or (not strict and p <= level):
            return f"({self._print(item)})"
        return self._print(item)

    def _print_Function(self, expr):
        name = type(expr).__name__
        if name in CUSTOM:
            return f"{name}({', '.join(self._print(a) for a in expr.args)})"
        return super()._print_Function(expr)

    def _print_Mul(self, expr):
        c, rest = expr.as_coeff_Mul()
        if c.is_negative:
            # SymPy parenthesizes the factors of a negative product against Add,
            # which leaves a product as divisor bare (-a/b*b). The sign goes first,
            # then the positive product: (-x)*y, (-x)/y, -x**y are -(x*y), -(x/y),
            # -(x**y) exactly, so only a sum needs parentheses after the sign.
            return "-" + self.parenthesize(_keep_coeff(-c, rest), PRECEDENCE["Mul"],
                                           strict=True)
        factors = [g for f in sp.Mul.make_args(expr) for g in _spelled_out(f)]
        if factors != list(expr.args):
            expr = sp.Mul(*factors, evaluate=False)
        return super()._print_Mul(expr)

    def _print_Pow(self, expr, rational=False):
        n = _product_power(expr)
        if n > 0:
            return "*".join([self.parenthesize(expr.base, PRECEDENCE["Mul"])] * n)
        if n < 0:  # 1.0/(b*b): a product of |n| divisors b
            return self._print_Mul(sp.Mul(*_spelled_out(expr), evaluate=False))
        return super()._print_Pow(expr, rational=rational)

    def _number(self, text):
        """A number in a kernel: ``_T(text)``, of the kernel's own float type (the
        kernel binds ``_T = <a float array>.dtype.type``). A bare Python number is a
        float64 to Numba: ``0.5*a`` in a float32 kernel would compute in float64, and
        a float64 argument takes tanh, exp and sigmoid off their vectorised float32
        versions (LayerNorm LSTM's forward loop: 779 -> 325 ms)."""
        return f"_T({text})" if self._settings["typed"] else text

    def _print_Float(self, expr):
        # The double SymPy holds, as Python writes it back exactly; SymPy's own
        # prints 15 digits (1/3. as 0.333333333333333, off by 1e-15).
        value = float(expr)
        return self._number(repr(value) if math.isfinite(value)
                            else super()._print_Float(expr))

    def _print_Rational(self, expr):
        return f"{self._print_Integer(expr.p)}/{self._print_Integer(expr.q)}"

    def _print_Integer(self, expr):
        return self._number(f"{int(expr)}") if self._settings["typed"] else f"{float(expr)}"

    def _print_Half(self, expr):
        return self._print_Rational(expr)

    def _print_Zero(self, expr):
        return self._print_Integer(expr)

    def _print_Symbol(self, expr):
        # a size (H) is an int64 argument: in a value, of the kernel's float type too
        if expr.name in self._settings["sizes"]:
            return self._number(expr.name)
        return super()._print_Symbol(expr)

    def _print_Exp1(self, expr):
        return self._number("math.e")

    def _print_Pi(self, expr):
        return self._number("math.pi")

    def _print_Infinity(self, expr):
        return self._number("math.inf")

    def _print_NegativeInfinity(self, expr):
        return self._number("-math.inf")

    def _print_NaN(self, expr):
        return self._number("math.nan")


def _spelled_out(factor):
    """The factors SymPy's _print_Mul is given for one factor of a product: b**n
    with |n| in PRODUCT_POWERS as |n| factors b (or divisors b), and (a*b)**n,
    integer n, as a**n, b**n. Products then print as 2.0*a*b*b and a/(b*b*c), not
    2.0*a*(b*b) and a/((b*b)*c), and no divisor is a product (around which SymPy
    pastes a second pair of parentheses)."""
    if factor.is_Pow and factor.is_commutative and factor.exp.is_Integer:
        base, n = factor.base, int(factor.exp)
        if base.is_Mul:
            return [g for f in base.args
                    for g in _spelled_out(sp.Pow(f, n, evaluate=False))]
        if abs(n) in PRODUCT_POWERS:
            return [base if n > 0 else sp.Pow(base, -1, evaluate=False)] * abs(n)
    return [factor]


def _product_power(expr):
    """n if expr is b**n or b**-n with n in PRODUCT_POWERS (signed), else 0."""
    if expr.is_Pow and expr.is_commutative and expr.exp.is_Integer \
            and abs(int(expr.exp)) in PRODUCT_POWERS:
        return int(expr.exp)
    return 0


class PrintError(ValueError):
    """An expression the code printers cannot print (names the function)."""


def _definition(call):
    """A user's own sympy.Function, written through functions a printer knows:
    its ``definition(*args)`` if the class has one, else a rewrite in exp.

    >>> class cube(sp.Function):
    ...     definition = staticmethod(lambda x: x**3)
    >>> pycode(cube(sp.Symbol("a")) + 1)
    'a*a*a + _T(1)'
    """
    cls = type(call)
    if hasattr(cls, "definition"):
        return cls.definition(*call.args)
    rewritten = call.rewrite(sp.exp)
    if rewritten != call and not rewritten.has(cls):
        return rewritten
    raise PrintError(
        f"cannot print the function '{cls.__name__}' as code: give its class a "
        f"definition, e.g. definition = staticmethod(lambda x: ...) returning a SymPy "
        "expression of known functions (its fdiff still gives the derivative)")


@functools.lru_cache(maxsize=None)
def _printer(typed=True, sizes=()):
    return NumbaPrinter({"typed": typed, "sizes": frozenset(sizes)})


def pycode(expr, typed=True, sizes=()):
    """Print one scalar expression; its numbers, and the ``sizes`` it reads (int64
    arguments of a kernel), of the kernel's float type (``_T``, see
    NumbaPrinter._number), or Python floats where ``typed`` is False (code run by
    Python on NumPy arrays).

    >>> a, b, H = sp.symbols("a b H")
    >>> pycode(sp.tanh(a) * (1 - b**2))
    '(_T(1) - b*b)*tanh(a)'
    >>> pycode(sp.tanh(a) * (1 - b**2), typed=False)
    '(1.0 - b*b)*tanh(a)'
    >>> pycode(-a / b**2)
    '-a/(b*b)'
    >>> pycode(a / H, sizes=("H",))
    'a/_T(H)'
    """
    return _printer(typed, tuple(sizes)).doprint(expr)


def pycode_factor(expr, typed=True, sizes=()):
    """Print an expression to be used as a factor of a product (parenthesised
    where precedence needs it).

    >>> pycode_factor(1 - sp.Symbol("z"))
    '(_T(1) - z)'
    """
    printer = _printer(typed, tuple(sizes))
    return printer.parenthesize(printer.written_out(expr), PRECEDENCE["Mul"])
