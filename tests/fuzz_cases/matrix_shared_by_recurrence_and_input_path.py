"""One matrix used in the recurrence and on a hoisted (pre-loop) path to the readout.

Found by bench/fuzz.py (seed 0, cells 70, 121, 220, 241, 289), shrunk. Every
algorithm's gradient of W_1 differs from central finite differences of the module's
own loss (relative error ~1, confirmed by the five-point stencil): the part of dW_1
from ``W_4 @ (W_1 @ x)`` is lost or misplaced. (The state does not even reach the
loss here; in the unshrunk cells it does.)
"""

from bpttgen.derive import Model, sse


def model():
    m = Model('cell', sizes=('V1',))
    v_in = m.input('xt', 'V1')
    s0 = m.state('h', 'V1')
    W0 = m.matrix('W_1', 'V1', 'V1')
    W3 = m.matrix('W_4', 'V1', 'V1')
    m.update(s0, W0 @ s0.prev)
    m.output(W3 @ (W0 @ v_in), loss=sse)
    return m
