"""LSTM with PyTorch's gate equations, one bias per gate, stackable.

i = sigma(W_i x + U_i h + b_i), f = sigma(...), g = tanh(...), o = sigma(...),
c_t = f * c_{t-1} + i * g,  h_t = o * tanh(c_t).
"""

from bpttgen.derive import Model, sigmoid, softmax_cross_entropy, tanh

GATES = {"i": sigmoid, "f": sigmoid, "g": tanh, "o": sigmoid}


def lstm(layers=1, loss=softmax_cross_entropy, name=None):
    m = Model(name or ("lstm" if layers == 1 else f"lstm{layers}"), sizes=("I", "H", "O"))
    below, below_size = m.input("x", "I"), "I"
    for l in range(1, layers + 1):
        k = "" if layers == 1 else str(l)
        h, c = m.state(f"h{k}", "H"), m.state(f"c{k}", "H")
        gate = {}
        for g, f in GATES.items():
            W = m.matrix(f"W_{g}{k}", "H", below_size)
            U = m.matrix(f"U_{g}{k}", "H", "H")
            b = m.bias(f"b_{g}{k}", "H")
            gate[g] = m.node(f"{g}{k}", f(W @ below + U @ h.prev + b))
        m.update(c, gate["f"] * c.prev + gate["i"] * gate["g"])
        below, below_size = m.update(h, gate["o"] * tanh(c)), "H"
    m.output(m.matrix("W_y", "O", "H") @ below + m.bias("b_y", "O"), loss=loss)
    return m
