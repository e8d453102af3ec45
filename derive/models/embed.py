"""An LSTM over integer tokens: a learned embedding looked up per step (``E[x]``), in
place of a one-hot input multiplied by a full matrix. The gates are lstm.py's.

e_t = E[:, x_t],  i = sigma(W_i e + U_i h + b_i), ..., the readout over the vocabulary.
"""

from bpttgen.derive import Model, softmax_cross_entropy, tanh

from .lstm import GATES


def embed_lstm(loss=softmax_cross_entropy, name="embed_lstm"):
    m = Model(name, sizes=("V", "D", "H"))
    x = m.tokens("x", vocab="V")
    e = m.embedding("E", "D", "V")[x]  # column x_t of the (D, V) table
    h, c = m.state("h", "H"), m.state("c", "H")
    gate = {}
    for g, f in GATES.items():
        W, U = m.matrix(f"W_{g}", "H", "D"), m.matrix(f"U_{g}", "H", "H")
        gate[g] = m.node(g, f(W @ e + U @ h.prev + m.bias(f"b_{g}", "H")))
    m.update(c, gate["f"] * c.prev + gate["i"] * gate["g"])
    m.update(h, gate["o"] * tanh(c))
    # predicts the next token: the readout is over the vocabulary
    m.output(m.matrix("W_y", "V", "H") @ h + m.bias("b_y", "V"), loss=loss)
    return m
