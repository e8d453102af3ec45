"""A state that does not read its previous value (a feed-forward step).

Found by bench/fuzz.py (seed 0, 9 of 300 cells, e.g. 40, 44, 61, 288), shrunk. derive
and render raise codegen's PlanError "cannot order the pre nodes ['W_3_h', 'z']": an
internal message for a cell a user may well write (e.g. a state that is a function of
the input alone, the other states reading it).
"""

from bpttgen.derive import Model, sse


def model():
    m = Model('cell', sizes=('V3',))
    v_in = m.input('v1', 'V3')
    s0 = m.state('h', 'V3')
    W0 = m.matrix('W_1', 'V3', 'V3')
    W2 = m.matrix('W_3', 'V3', 'V3')
    m.update(s0, W0 @ v_in)
    m.output(W2 @ s0.t, loss=sse)
    return m
