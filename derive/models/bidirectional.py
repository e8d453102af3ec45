"""A bidirectional Elman layer (as ``torch.nn.RNN(bidirectional=True)``): a forward
recurrence hf_t = tanh(W_f x_t + U_f hf_{t-1} + b_f), a reverse one hb_t = tanh(W_b x_t
+ U_b hb_{t+1} + b_b) that runs from the last step down to the first, and a readout
y_t = g(V_f hf_t + V_b hb_t + b_y) of both."""

from bpttgen.derive import Model, softmax_cross_entropy, tanh


def bielman(loss=softmax_cross_entropy, name="bielman"):
    m = Model(name, sizes=("I", "H", "O"))
    x = m.input("x", "I")
    hf = m.state("hf", "H")
    hb = m.state("hb", "H", reverse=True)  # hb.prev is hb_{t+1}
    W_f, U_f, b_f = m.matrix("W_f", "H", "I"), m.matrix("U_f", "H", "H"), m.bias("b_f", "H")
    W_b, U_b, b_b = m.matrix("W_b", "H", "I"), m.matrix("U_b", "H", "H"), m.bias("b_b", "H")
    m.update(hf, tanh(W_f @ x + U_f @ hf.prev + b_f))
    m.update(hb, tanh(W_b @ x + U_b @ hb.prev + b_b))
    V_f, V_b, b_y = m.matrix("V_f", "O", "H"), m.matrix("V_b", "O", "H"), m.bias("b_y", "O")
    m.output(V_f @ hf + V_b @ hb + b_y, loss=loss)
    return m
