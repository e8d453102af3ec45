"""GRU with PyTorch's equations.

r = sigma(W_r x + b_ir + U_r h + b_hr), z = sigma(W_z x + b_iz + U_z h + b_hz),
n = tanh(W_n x + b_in + r * (U_n h + b_hn)),  h_t = (1 - z) * n + z * h_{t-1}.
"""

from bpttgen.derive import Model, sigmoid, softmax_cross_entropy, tanh


def gru(loss=softmax_cross_entropy, name="gru"):
    m = Model(name, sizes=("I", "H", "O"))
    x = m.input("x", "I")
    h = m.state("h", "H")
    W = {g: m.matrix(f"W_{g}", "H", "I") for g in "rzn"}
    U = {g: m.matrix(f"U_{g}", "H", "H") for g in "rzn"}
    b_i = {g: m.bias(f"b_i{g}", "H") for g in "rzn"}
    b_h = {g: m.bias(f"b_h{g}", "H") for g in "rzn"}
    r = m.node("r", sigmoid(W["r"] @ x + b_i["r"] + U["r"] @ h.prev + b_h["r"]))
    z = m.node("zg", sigmoid(W["z"] @ x + b_i["z"] + U["z"] @ h.prev + b_h["z"]))
    n = m.node("n", tanh(W["n"] @ x + b_i["n"] + r * (U["n"] @ h.prev + b_h["n"])))
    m.update(h, (1 - z) * n + z * h.prev)
    m.output(m.matrix("W_y", "O", "H") @ h + m.bias("b_y", "O"), loss=loss)
    return m
