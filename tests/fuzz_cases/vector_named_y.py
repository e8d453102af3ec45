"""A vector named y, whose value array y_seq is also the kernels' prediction array.

Found by bench/fuzz.py (seed 10, cell 1229): the generated module did not import
(SyntaxError: duplicate argument 'y_seq'). y is now refused at its line, like the
kernels' other names.
"""

from bpttgen import Model, sse

EXPECT = "refused"


def model():
    m = Model('cell', sizes=('I', 'H'))
    v_in = m.input('y', 'I')
    s0 = m.state('h', 'H')
    W = m.matrix('W', 'H', 'I')
    m.update(s0, W @ v_in + s0.prev)
    m.output(s0.t, loss=sse)
    return m
