"""The same product W @ x written twice.

Found by bench/fuzz.py (about 8% of cells write a product twice; e.g. seed 1, cells 3,
102, 132). Refused at the second ``W @ x`` with "name 'W_x' is already defined, as a
node", a name the user never wrote. The two products are the same vector: a fix
reuses the node (or at least says that the product is repeated).
"""

from bpttgen import Model, sigmoid, sse, tanh


def model():
    m = Model('cell', sizes=('I', 'H', 'O'))
    x = m.input('x', 'I')
    h = m.state('h', 'H')
    W, U = m.matrix('W', 'H', 'I'), m.matrix('U', 'H', 'H')
    gate = sigmoid(W @ x + U @ h.prev)
    m.update(h, (1 - gate) * h.prev + gate * tanh(W @ x))
    m.output(m.matrix('V', 'O', 'H') @ h, loss=sse)
    return m
