"""Scalar functions SymPy lacks, each with its derivative rule (``fdiff``).

These sit at the bottom of the data flow: model definitions apply them elementwise,
``sympy.diff`` differentiates them through ``fdiff``, and the printers in codegen/
and derive/latex.py print them by class name. A derivative is written through the
function's own value where that is possible (sigma' = sigma (1 - sigma)), so the
simplifier can later replace it by a value the forward pass already stored.
"""

import sympy as sp


class _RealFunction(sp.Function):
    """A real function of a real argument that SymPy can evaluate numerically
    (through ``_numeric``), so comparisons like Max(softplus(1), x) work."""

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_evalf(self, prec):
        if self.args[0].is_number:
            return self._numeric(self.args[0])._eval_evalf(prec)
        return None


class sigmoid(_RealFunction):
    """Logistic function 1 / (1 + exp(-x)).

    >>> x = sp.Symbol("x")
    >>> sp.diff(sigmoid(x), x)
    (1 - sigmoid(x))*sigmoid(x)
    """

    def fdiff(self, argindex=1):
        s = sigmoid(self.args[0])
        return s * (1 - s)

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return 1 / (1 + sp.exp(-x))

    _numeric = _eval_rewrite_as_exp


class softplus(_RealFunction):
    """log(1 + exp(x)), whose derivative is the sigmoid.

    >>> x = sp.Symbol("x")
    >>> sp.diff(softplus(x), x)
    sigmoid(x)
    """

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return sp.log(1 + sp.exp(x))

    _numeric = _eval_rewrite_as_exp


class relu(_RealFunction):
    """max(x, 0); its derivative is the step function (taken as 0 at x = 0).

    >>> x = sp.Symbol("x")
    >>> sp.diff(relu(x), x)
    step(x)
    """

    def fdiff(self, argindex=1):
        return step(self.args[0])

    def _eval_rewrite_as_Max(self, x, **kwargs):
        return sp.Max(x, 0)

    _numeric = _eval_rewrite_as_Max


class step(_RealFunction):
    """1 for x > 0, else 0: the derivative of relu. Its own derivative is 0
    almost everywhere, which is what gradient descent uses."""

    def fdiff(self, argindex=1):
        return sp.S.Zero

    def _numeric(self, x):
        return sp.Piecewise((1, x > 0), (0, True))


#: Functions a definition may use beside SymPy's elementary ones, by name.
CUSTOM = {f.__name__: f for f in (sigmoid, softplus, relu, step)}


def numpy_implementations():
    """NumPy versions of CUSTOM, for ``sympy.lambdify`` in the reference."""
    import numpy as np

    return {
        "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
        "softplus": lambda x: np.logaddexp(0.0, x),
        "relu": lambda x: np.maximum(x, 0.0),
        "step": lambda x: np.asarray(x > 0, np.result_type(x, np.float32)),
    }
