"""A user's cell for tests/test_latex.py, loaded by path like any definition file.

A leaky unit with a learned per-unit leak rate, a diagonal (elementwise) recurrent
weight, softplus and a user's own function, a ReLU below the readout, and a binary
cross-entropy loss at the last step only: paths the built-in models do not take.
"""

import sympy as sp

from bpttgen.derive import Model, relu, sigmoid, sigmoid_bce, softplus


class swish(sp.Function):
    """x * sigmoid(x), a user's function: sympy.diff differentiates it through fdiff,
    code printers print its definition."""

    definition = staticmethod(lambda x: x * sigmoid(x))

    def fdiff(self, argindex=1):
        x = self.args[0]
        return sigmoid(x) * (1 + x * (1 - sigmoid(x)))


def model():
    m = Model("leaky", sizes=("I", "H", "O"))
    x = m.input("x", "I")
    h = m.state("h", "H")
    leak = m.node("a", sigmoid(m.matrix("W_a", "H", "I") @ x + m.bias("b_a", "H")))
    drive = softplus(m.matrix("W_xh", "H", "I") @ x + m.diagonal("v_h", "H") * h.prev
                     + m.bias("b_h", "H"))
    m.update(h, (1 - leak) * h.prev + leak * drive)
    features = (m.matrix("W_hy", "O", "H") @ relu(h)).apply(swish)
    m.output(features + m.bias("b_y", "O"), loss=sigmoid_bce, at="last")
    return m
