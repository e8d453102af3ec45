"""SymPy printers for generated Numba code: scalar expressions inside fused loops.

Target differences are tables (``_known_functions_math``), as in SymPy's own
pycode printers. tanh, exp and the functions derive/ adds (sigmoid, softplus, relu,
step) print as calls to the scalar helpers of codegen/kernel_functions.py, which
the generated module imports under the same names (float32 kernels get
vectorisable versions); everything else prints as ``math.*``. A user's own
``sympy.Function`` prints through its ``definition``.
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
        # tanh and exp from codegen.kernel_functions: exact in float64,
        # vectorisable in float32.
        self.known_functions["tanh"] = "tanh"
        self.known_functions["exp"] = "exp"

    def _print_Function(self, expr):
        name = type(expr).__name__
        if name in CUSTOM:
            return f"{name}({', '.join(self._print(a) for a in expr.args)})"
        if name in self.known_functions or hasattr(self, f"_print_{name}"):
            return super()._print_Function(expr)
        return self._print(_definition(expr))

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


class PrintError(ValueError):
    """An expression the code printers cannot print (names the function)."""


def _definition(call):
    """A user's own sympy.Function, written through functions a printer knows:
    its ``definition(*args)`` if the class has one, else a rewrite in exp.

    >>> class cube(sp.Function):
    ...     definition = staticmethod(lambda x: x**3)
    >>> pycode(cube(sp.Symbol("a")) + 1)
    'a*a*a + 1.0'
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


_printer = NumbaPrinter()


def pycode(expr):
    """Print one scalar expression.

    >>> a, b = sp.symbols("a b")
    >>> pycode(sp.tanh(a) * (1 - b**2))
    '(1.0 - b*b)*tanh(a)'
    """
    return _printer.doprint(expr)


def pycode_factor(expr):
    """Print an expression to be used as a factor of a product (parenthesised
    where precedence needs it).

    >>> pycode_factor(1 - sp.Symbol("z"))
    '(1.0 - z)'
    """
    return _printer.parenthesize(expr, sp.printing.precedence.PRECEDENCE["Mul"])
