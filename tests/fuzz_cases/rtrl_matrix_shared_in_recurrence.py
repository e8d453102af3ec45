"""One matrix applied to two different vectors of the recurrence.

Found by bench/fuzz.py (seed 0, 23 of 300 cells, e.g. 0, 9, 41, 168), shrunk.
rtrl's gradient of W_2 differs from bptt's (and from finite differences) by O(1);
bptt, naive, tbptt, epochwise and artbp agree with finite differences.
"""

from bpttgen.derive import Model, sse


def model():
    m = Model('cell', sizes=('V4',))
    v_in = m.input('v1', 'V4')
    s0 = m.state('h', 'V4')
    W0 = m.matrix('W_1', 'V4', 'V4')
    W1 = m.matrix('W_2', 'V4', 'V4')
    W3 = m.matrix('W_4', 'V4', 'V4')
    m.update(s0, W1 @ s0.prev + W1 @ (W0 @ s0.prev))
    m.output(W3 @ s0.t, loss=sse)
    return m
