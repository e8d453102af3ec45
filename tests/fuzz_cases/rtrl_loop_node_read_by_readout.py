"""A node of the recurrence (n2 = W_1 h_{t-1}) that the readout reads too.

Found by bench/fuzz.py (seed 2, cell 499), shrunk. rtrl's gradients of W_1 (and of a
bias in the unshrunk cell) differ from bptt's by O(1); bptt, naive, tbptt, epochwise
and artbp agree with finite differences.
"""

from bpttgen import Model, sse


def model():
    m = Model('cell', sizes=('V4',))
    v_in = m.input('v1', 'V4')
    s0 = m.state('h', 'V4')
    W0 = m.matrix('W_1', 'V4', 'V4')
    W3 = m.matrix('W_4', 'V4', 'V4')
    W8 = m.matrix('W_9', 'V4', 'V4')
    n1 = m.node('n2', W0 @ s0.prev)
    m.update(s0, W3 @ n1 + v_in)
    m.output(W8 @ n1, loss=sse)
    return m
