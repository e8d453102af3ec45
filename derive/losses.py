"""Per-step losses as SymPy expressions, with the error dl/dz derived, not tabled.

A loss sees the readout z (one element z_k at a time), the target d (d_k; one-hot
for integer targets) and a shift m = max_k z_k that the loss may subtract for
numerical range. Its value is a function of sums over the output units,
``value(R_1, ..., R_n)`` with ``R_r = sum_k summand_r(z_k, d_k)``, so softmax
cross-entropy, which couples the units through its normaliser, fits the same
form as SSE. The error is then dl/dz_k = sum_r dvalue/dR_r * dsummand_r/dz_k,
both factors from ``sympy.diff``.

The shift m is held constant while differentiating. That is exact only for a loss
that is invariant to adding a constant to every z_k (log-sum-exp is); a user loss
that is not must not use m.
"""

from dataclasses import dataclass

import sympy as sp

from .errors import _caller_location
from .functions import sigmoid, softplus

#: element of the readout, element of the target, the shift max_k z_k, output size
z, d, m, K = sp.symbols("z d m K", real=True)


class LossError(ValueError):
    """A loss definition that cannot be used (not scalar, unknown symbols); the
    message starts with the file:line that defines the loss."""

    def __init__(self, message):
        self.location = _caller_location()
        super().__init__(f"{self.location}: {message}" if self.location else message)


@dataclass(frozen=True)
class Loss:
    """One step's loss l_t(z, d) and the prediction y that inference reports."""

    name: str
    target: str  # "index": integer class per step; "vector": a float per output unit
    sums: tuple  # ((reduction symbol, summand in z, d, m), ...)
    value: sp.Expr  # in the reduction symbols, m and K
    prediction: sp.Expr  # y_k in z, m and the reduction symbols
    description: str = ""

    def __post_init__(self):
        if self.target not in ("index", "vector"):
            raise LossError(f"loss {self.name!r}: target must be 'index' or 'vector', "
                            f"got {self.target!r}")
        reductions = {sym for sym, _ in self.sums}
        leaked = self.value.free_symbols & {z, d}
        if leaked:
            raise LossError(
                f"loss {self.name!r} is not scalar: its value uses the per-unit symbol(s) "
                f"{sorted(map(str, leaked))} outside a sum over output units; put them in "
                "a summand")
        for what, expr, allowed in (
            ("value", self.value, reductions | {m, K}),
            ("prediction", self.prediction, reductions | {z, m, K}),
        ):
            unknown = expr.free_symbols - allowed
            if unknown:
                names = sorted(map(str, unknown))
                hint = next((f" ('{n}' is an option of custom_loss, not a sum: rename the "
                             "sum)" for n in names if n in _OPTIONS), "")
                raise LossError(f"loss {self.name!r}: {what} uses undefined symbol(s) "
                                f"{names}{hint}")
        for sym, summand in self.sums:
            unknown = summand.free_symbols - {z, d, m, K}
            if unknown:
                raise LossError(f"loss {self.name!r}: summand {sym} uses undefined "
                                f"symbol(s) {sorted(map(str, unknown))}")

    def raw_error(self):
        """dl/dz_k from SymPy by the chain rule through the sums, as differentiated."""
        return sum((sp.diff(self.value, sym) * sp.diff(summand, z)
                    for sym, summand in self.sums), sp.S.Zero)

    def error(self):
        """dl/dz_k, rewritten through the prediction y where it appears.

        >>> softmax_cross_entropy.error()
        -d + y
        """
        return self.raw_error().subs(self.prediction, sp.Symbol("y", real=True))


def custom_loss(name, value, /, *, target="vector", prediction=z, description="", **sums):
    """A loss from a user's SymPy expressions; ``sums`` name the reductions.

    The error is written through the prediction y, here z itself:

    >>> S = sp.Symbol("S")
    >>> custom_loss("l1ish", S, S=sp.sqrt((z - d)**2 + 1)).error()
    (-d + y)/sqrt((-d + y)**2 + 1)
    """
    from .naming import identifier_problem

    for key in sums:
        problem = identifier_problem(key, "loss sum")
        if problem:
            raise LossError(f"loss {name!r}: cannot name a sum {key!r}: {problem}; the "
                            "generated loss kernel uses it as a variable name")
    known = {s.name: s for s in (z, d, m, K)}
    known.update({key: sp.Symbol(key, real=True) for key in sums})

    def canonical(expr):  # a plain Symbol("z") or Symbol("S") means derive's own
        expr = sp.sympify(expr)
        return expr.xreplace({s: known[s.name] for s in expr.free_symbols
                              if s.name in known})

    pairs = tuple((known[key], canonical(expr)) for key, expr in sums.items())
    return Loss(name, target, pairs, canonical(value), canonical(prediction), description)


#: custom_loss's keyword options: a sum cannot be named like one of them.
_OPTIONS = ("target", "prediction", "description")

_S, _D = sp.symbols("S D", real=True)

sse = Loss("sse", "vector", ((_S, (z - d) ** 2 / 2),), _S, z,
           "sum of squared errors, 1/2 sum_k (z_k - d_k)^2")
mse = Loss("mse", "vector", ((_S, (z - d) ** 2),), _S / (2 * K), z,
           "mean squared error, 1/(2K) sum_k (z_k - d_k)^2")
softmax_cross_entropy = Loss(
    "softmax_ce", "index", ((_S, sp.exp(z - m)), (_D, d * z)), sp.log(_S) + m - _D,
    sp.exp(z - m) / _S, "softmax cross-entropy with an integer target class")
sigmoid_bce = Loss(
    "sigmoid_bce", "vector", ((_S, softplus(z) - d * z),), _S, sigmoid(z),
    "binary cross-entropy of sigmoid(z) against targets in [0, 1]")

BUILTIN = {loss.name: loss for loss in (sse, mse, softmax_cross_entropy, sigmoid_bce)}
