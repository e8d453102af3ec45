"""A user's own cell, defined outside derive/: a minimal gated unit with a twist.

    f_t = sigmoid(W_f x_t + U_f h_{t-1} + p_f * h_{t-1} + V_f c_t + b_f)  (peephole,
                                                                     conditioning c_t)
    n_t = tanh(logaddexp(W_n x_t + b_n, U_n (f_t * h_{t-1})))        (a user expression)
    h_t = (1 - f_t) * h_{t-1} + f_t * n_t                            (Hadamard products)
    z_t = W_y softplus(h_t) + b_y

A call's x holds the two inputs side by side, (T, B, I + C): the sequence x_t and a
conditioning vector c_t per step. ``logaddexp`` is the user's own SymPy expression log(exp(a) + exp(b)) (a smooth
max), given to ``m.expr``. Load it with ``derive.loader.load_model(path)`` or
``bpttgen``'s file argument; ``model(loss=...)`` takes any loss, such as the two
custom losses below.
"""

import sympy

from bpttgen.derive import Model, custom_loss, sigmoid, softmax_cross_entropy, softplus, tanh
from bpttgen.derive.losses import d, m as shift, z

a, b = sympy.symbols("a b", real=True)
LOGADDEXP = sympy.log(sympy.exp(a) + sympy.exp(b))

_S, _D = sympy.symbols("S D", real=True)

#: log-cosh regression loss, sum_k log(cosh(z_k - d_k)): quadratic near 0, linear far.
log_cosh = custom_loss("log_cosh", _S, S=sympy.log(sympy.cosh(z - d)),
                       description="sum_k log cosh(z_k - d_k)")

#: softmax cross-entropy at temperature 2: log sum_k exp(z_k / 2) - z_target / 2,
#: shifted by m = max_k z_k for range (invariant, so the shift is exact).
tempered_softmax = custom_loss(
    "tempered_softmax", sympy.log(_S) + shift / 2 - _D / 2, target="index",
    prediction=sympy.exp((z - shift) / 2) / _S,
    S=sympy.exp((z - shift) / 2), D=d * z,
    description="softmax cross-entropy of z / 2 with an integer target class")

LOSSES = {"softmax_ce": softmax_cross_entropy, "log_cosh": log_cosh,
          "tempered_softmax": tempered_softmax}


def model(loss=softmax_cross_entropy, name="user_cell"):
    m = Model(name, sizes=("I", "C", "H", "O"))
    x, c = m.input("x", "I"), m.input("c", "C")
    h = m.state("h", "H")
    f = m.node("f", sigmoid(m.matrix("W_f", "H", "I") @ x + m.matrix("U_f", "H", "H") @ h.prev
                            + m.diagonal("p_f", "H") * h.prev + m.matrix("V_f", "H", "C") @ c
                            + m.bias("b_f", "H")))
    drive = m.matrix("W_n", "H", "I") @ x + m.bias("b_n", "H")
    recurrent = m.matrix("U_n", "H", "H") @ (f * h.prev)
    n = m.node("n", tanh(m.expr(LOGADDEXP, a=drive, b=recurrent)))
    m.update(h, (1 - f) * h.prev + f * n)
    m.output(m.matrix("W_y", "O", "H") @ softplus(h) + m.bias("b_y", "O"), loss=loss)
    return m
