"""Simplification rules: about functions and stored values, never about cells.

Each rule is a small object with ``apply(expr)``; ``simplify`` runs them in order.
A new cell inherits them all: tanh' = 1 - h^2 and sigma' = y (1 - y) come out of
``ThroughStoredValues`` because SymPy writes those derivatives through the
function's own value, which the forward pass has stored under the node's name.
"""

from dataclasses import dataclass

import sympy as sp


@dataclass(frozen=True)
class ThroughStoredValues:
    """Replace a subexpression by the symbol of the stored node that holds it.

    >>> a, h = sp.symbols("a h")
    >>> ThroughStoredValues(((sp.tanh(a), h),)).apply(sp.diff(sp.tanh(a), a))
    1 - h**2
    >>> from bpttgen.derive.functions import sigmoid
    >>> ThroughStoredValues(((sigmoid(a), h),)).apply(sp.diff(sigmoid(a), a))
    h*(1 - h)
    """

    values: tuple  # ((expression, symbol), ...), latest node first

    def apply(self, expr):
        for value, symbol in self.values:
            expr = expr.subs(value, symbol)
        return expr


@dataclass(frozen=True)
class DropZeroSteps:
    """The derivative of a step function is zero almost everywhere.

    >>> from bpttgen.derive.functions import step
    >>> a = sp.Symbol("a")
    >>> DropZeroSteps().apply(3 * sp.Derivative(step(a), a) + 1)
    1
    """

    def apply(self, expr):
        return expr.replace(lambda e: isinstance(e, sp.Derivative), lambda e: sp.S.Zero)


def simplify(expr, rules):
    """Apply each rule in turn.

    >>> a, h = sp.symbols("a h")
    >>> simplify(sp.diff(sp.tanh(a) * 2, a), [ThroughStoredValues(((sp.tanh(a), h),))])
    2 - 2*h**2
    """
    for rule in rules:
        expr = rule.apply(expr)
    return expr


def cse(exprs, prefix="t"):
    """Common subexpressions of a block of expressions, numbered temporaries.

    >>> a = sp.Symbol("a")
    >>> cse([sp.exp(a) + 1, 2 * sp.exp(a)])
    ([(t0, exp(a))], [t0 + 1, 2*t0])
    """
    temps, reduced = sp.cse(list(exprs), symbols=sp.numbered_symbols(prefix, real=True),
                            order="none")
    return temps, reduced
