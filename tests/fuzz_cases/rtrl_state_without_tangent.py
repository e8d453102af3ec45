"""A state whose update reads nothing with a tangent (here identically zero), read by
the readout.

Found by bench/fuzz.py (seed 10, cells 1560 and 1796), shrunk. rtrl printed
``grad[_p] += _a*None`` (TypeError) and carried an uninitialised tangent: a state with
no tangent now adds nothing to grad and carries zeros.
"""

from bpttgen import Model, sse


def model():
    m = Model('cell', sizes=('G',))
    v_in = m.input('v1', 'G')
    s0 = m.state('v2', 'G')
    s1 = m.state('v3', 'G')
    W0 = m.matrix('v4', 'G', 'G')
    W2 = m.matrix('v7', 'G', 'G')
    m.update(s0, s0.prev - s0.prev)
    m.update(s1, W0 @ s1.prev)
    m.output(W2 @ s0.t, loss=sse)
    return m
