"""A user's cell for tests/test_cuda.py, loaded by path like any definition file.

A leaky unit with a learned per-unit leak rate, a diagonal (elementwise) recurrent
weight, softplus, a ReLU below the readout and a binary cross-entropy loss at the
last step only: vector targets, a diagonal parameter's per-row gradient and a
post-loop elementwise node, paths the built-in models do not take on the GPU.
"""

from derive import Model, relu, sigmoid, sigmoid_bce, softplus


def model():
    m = Model("leaky_cuda", sizes=("I", "H", "O"))
    x = m.input("x", "I")
    h = m.state("h", "H")
    leak = m.node("a", sigmoid(m.matrix("W_a", "H", "I") @ x + m.bias("b_a", "H")))
    drive = softplus(m.matrix("W_xh", "H", "I") @ x + m.diagonal("v_h", "H") * h.prev
                     + m.bias("b_h", "H"))
    m.update(h, (1 - leak) * h.prev + leak * drive)
    m.output(m.matrix("W_hy", "O", "H") @ relu(h) + m.bias("b_y", "O"), loss=sigmoid_bce,
             at="last")
    return m
