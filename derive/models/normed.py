"""Cells with a normalisation over the units inside the step (reductions).

layernorm_lstm: PyTorch's fastrnns ``LayerNormLSTMCell`` (benchmarks/fastrnns/
custom_lstms.py): LayerNorm over the four gates' input products together, over their
recurrent products together, and over the new cell,

    [i f g o] = LN_x([W_i W_f W_g W_o] x) + LN_h([U_i U_f U_g U_o] h_{t-1}),
    c_t = LN_c(sigma(f) * c_{t-1} + sigma(i) * tanh(g)),  h_t = sigma(o) * tanh(c_t),

each LN with a gain and a bias (so the products need none). rmsnorm: an Elman cell
with RMSNorm (Zhang and Sennrich 2019) on the pre-activation,

    h_t = tanh(RMSNorm(W_xh x_t + W_hh h_{t-1} + b_h) * gamma).
"""

from bpttgen.derive import Model, sigmoid, softmax_cross_entropy, tanh

GATES = {"i": sigmoid, "f": sigmoid, "g": tanh, "o": sigmoid}


def layernorm_lstm(loss=softmax_cross_entropy, name="layernorm_lstm"):
    m = Model(name, sizes=("I", "H", "O"))
    x = m.input("x", "I")
    h, c = m.state("h", "H"), m.state("c", "H")
    normed = {}
    for side, v, size in (("x", x, "I"), ("h", h.prev, "H")):
        products = [m.matrix(f"{'W' if side == 'x' else 'U'}_{g}", "H", size) @ v
                    for g in GATES]
        ln = m.layernorm(*products, name=side,
                         gain=[m.gain(f"gamma_{side}{g}", "H") for g in GATES],
                         bias=[m.bias(f"beta_{side}{g}", "H") for g in GATES])
        # named, so the derivation prints each gate's pre-activation on a line of its own
        normed[side] = [m.node(f"a_{g}{side}", v) for g, v in zip(GATES, ln)]
    gate = {g: m.node(g, f(normed["x"][k] + normed["h"][k]))
            for k, (g, f) in enumerate(GATES.items())}
    s = m.node("s", gate["f"] * c.prev + gate["i"] * gate["g"])
    m.update(c, m.layernorm(s, name="c", gain=m.gain("gamma_c", "H"),
                            bias=m.bias("beta_c", "H")))
    m.update(h, gate["o"] * tanh(c))
    m.output(m.matrix("W_y", "O", "H") @ h + m.bias("b_y", "O"), loss=loss)
    return m


def rmsnorm(loss=softmax_cross_entropy, name="rmsnorm"):
    m = Model(name, sizes=("I", "H", "O"))
    x = m.input("x", "I")
    h = m.state("h", "H")
    a = m.node("a", m.matrix("W_xh", "H", "I") @ x + m.matrix("W_hh", "H", "H") @ h.prev
               + m.bias("b_h", "H"))
    m.update(h, tanh(m.rmsnorm(a, gain=m.gain("gamma", "H"), name="a")))
    m.output(m.matrix("W_hy", "O", "H") @ h + m.bias("b_y", "O"), loss=loss)
    return m
