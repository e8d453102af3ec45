"""A size that no parameter, input or state uses.

Found by bench/fuzz.py (seed 0, cells 108, 136, ...), shrunk. forward() and
loss_and_grads raise ``KeyError: 'E'`` (the module cannot read size E off the
arguments). Working or a refusal at definition time are both fixes.
"""

from bpttgen.derive import Model, sse

EXPECT = "ok|refused"


def model():
    m = Model('cell', sizes=('V4', 'E'))
    v_in = m.input('v1', 'V4')
    s0 = m.state('h', 'V4')
    W = m.matrix('W', 'V4', 'V4')
    m.update(s0, W @ s0.prev + v_in)
    m.output(s0.t, loss=sse)
    return m
