"""SymPy printers for generated Numba code: scalar expressions inside fused loops.

Target differences are tables (``_known_functions_math``), as in SymPy's own
pycode printers. Functions derive/ adds (sigmoid, softplus, relu, step) print as
calls to the scalar ``@njit`` helpers of codegen/runtime.py, which the generated
module imports under the same names; everything else prints as ``math.*``.
"""

import sympy as sp
from sympy.printing.pycode import PythonCodePrinter

from derive.functions import CUSTOM


class NumbaPrinter(PythonCodePrinter):
    """Scalar Python for @njit loops: ``math.tanh(a)``, ``sigmoid(a)``, floats."""

    _kf = dict(PythonCodePrinter._kf)

    def __init__(self, settings=None):
        super().__init__({"fully_qualified_modules": True, "standard": "python3",
                          **(settings or {})})
        for name in CUSTOM:
            self.known_functions[name] = name
        # tanh from codegen.runtime: exact in float64, vectorisable in float32.
        self.known_functions["tanh"] = "tanh"

    def _print_Function(self, expr):
        if type(expr).__name__ in CUSTOM:
            return f"{type(expr).__name__}({', '.join(self._print(a) for a in expr.args)})"
        return super()._print_Function(expr)

    def _print_Pow(self, expr, rational=False):
        base, exp = expr.args
        # Small integer powers as products: exact and vectorisable.
        if exp.is_Integer and 2 <= int(exp) <= 4:
            b = self.parenthesize(base, sp.printing.precedence.PRECEDENCE["Mul"])
            return "*".join([b] * int(exp))
        if exp == -1:
            return f"1.0/{self.parenthesize(base, sp.printing.precedence.PRECEDENCE['Pow'])}"
        return super()._print_Pow(expr, rational=rational)

    def _print_Rational(self, expr):
        return f"{float(expr.p)}/{float(expr.q)}"

    def _print_Integer(self, expr):
        return f"{float(expr)}"

    def _print_Exp1(self, expr):
        return "math.e"


_printer = NumbaPrinter()


def pycode(expr):
    """Print one scalar expression.

    >>> a, b = sp.symbols("a b")
    >>> pycode(sp.tanh(a) * (1 - b**2))
    '(1.0 - b*b)*math.tanh(a)'
    """
    return _printer.doprint(expr)


def pycode_factor(expr):
    """Print an expression to be used as a factor of a product (parenthesised
    where precedence needs it).

    >>> pycode_factor(1 - sp.Symbol("z"))
    '(1.0 - z)'
    """
    return _printer.parenthesize(expr, sp.printing.precedence.PRECEDENCE["Mul"])
