"""``2 ** v`` on a vector, ``s ** 2`` and ``1 / s`` on a State read at t.

Found by bench/fuzz.py (seed 1, cell 238: ``TypeError: unsupported operand type(s)
for ** or pow(): 'int' and 'Vec'``); State also lacks __pow__ and __rtruediv__
(``s ** 2``, ``1 / s``), which the Vec it stands for has.
"""

from bpttgen import Model, sse, tanh


def model():
    m = Model('cell', sizes=('V3',))
    v_in = m.input('v1', 'V3')
    s0 = m.state('h', 'V3')
    W = m.matrix('W', 'V3', 'V3')
    m.update(s0, tanh(W @ s0.prev + 2 ** tanh(v_in)))
    m.output(s0 ** 2 + 1 / (1 + s0 * s0), loss=sse)
    return m
