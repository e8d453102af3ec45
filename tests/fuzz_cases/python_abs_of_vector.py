"""abs() of a vector, as a user writes it in Python.

Found by bench/fuzz.py (seed 1, cells 68, 211, 321; seed 20240601, cells 3, 6, 19 of an
earlier generator), shrunk. The definition fails with ``TypeError: bad operand type for
abs(): 'Vec'``: Vec (and State) have no __abs__, while ``v.apply(sympy.Abs)`` works.
"""

from bpttgen import Model, sse


def model():
    m = Model('cell', sizes=('V3',))
    v_in = m.input('v1', 'V3')
    s0 = m.state('h', 'V3')
    W = m.matrix('W', 'V3', 'V3')
    m.update(s0, abs(W @ s0.prev) + v_in)
    m.output(s0.t, loss=sse)
    return m
