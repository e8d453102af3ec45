"""Seed 004's multi-level net: a feed-forward level below and above the recurrent one.

u_t = tanh(W_1 x_t + b_1),  s_t = tanh(W_r u_t + V s_{t-1} + b_r),
v_t = tanh(W_2 s_t + b_2),  z_t = W_o v_t + b_o.
"""

from bpttgen.derive import Model, softmax_cross_entropy, tanh


def deep(loss=softmax_cross_entropy, name="deep"):
    m = Model(name, sizes=("I", "F", "H", "O"))
    x = m.input("x", "I")
    s = m.state("s", "H")
    u = m.node("u", tanh(m.matrix("W_1", "F", "I") @ x + m.bias("b_1", "F")))
    m.update(s, tanh(m.matrix("W_r", "H", "F") @ u + m.matrix("V", "H", "H") @ s.prev
                     + m.bias("b_r", "H")))
    v = m.node("v", tanh(m.matrix("W_2", "F", "H") @ s + m.bias("b_2", "F")))
    m.output(m.matrix("W_o", "O", "F") @ v + m.bias("b_o", "O"), loss=loss)
    return m
