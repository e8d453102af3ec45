"""Stacked Elman network: layer l reads layer l-1's state at the same step."""

from bpttgen.derive import Model, softmax_cross_entropy, tanh


def stacked_elman(layers=2, loss=softmax_cross_entropy, name=None):
    m = Model(name or f"elman{layers}", sizes=("I", "H", "O"))
    below, below_size = m.input("x", "I"), "I"
    for l in range(1, layers + 1):
        h = m.state(f"h{l}", "H")
        a = (m.matrix(f"W_xh{l}", "H", below_size) @ below
             + m.matrix(f"W_hh{l}", "H", "H") @ h.prev + m.bias(f"b_h{l}", "H"))
        below, below_size = m.update(h, tanh(a)), "H"
    m.output(m.matrix("W_hy", "O", "H") @ below + m.bias("b_y", "O"), loss=loss)
    return m
