"""Elman network (seed 002): h_t = f(W_xh x_t + W_hh h_{t-1} + b_h), y_t = g(W_hy h_t + b_y)."""

from bpttgen.derive import Model, sigmoid, softmax_cross_entropy, tanh

ACTIVATIONS = {"tanh": tanh, "sigmoid": sigmoid}


def elman(activation="tanh", loss=softmax_cross_entropy, name="elman"):
    f = ACTIVATIONS[activation]
    m = Model(name, sizes=("I", "H", "O"))
    x = m.input("x", "I")
    h = m.state("h", "H")
    W_xh, W_hh, b_h = m.matrix("W_xh", "H", "I"), m.matrix("W_hh", "H", "H"), m.bias("b_h", "H")
    m.update(h, f(W_xh @ x + W_hh @ h.prev + b_h))
    W_hy, b_y = m.matrix("W_hy", "O", "H"), m.bias("b_y", "O")
    m.output(W_hy @ h + b_y, loss=loss)
    return m
