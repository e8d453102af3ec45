"""A readout that reads a previous state through a matrix product.

Found by bench/fuzz.py (seed 0, cells 11, 12, 13, 38, ... : 20 of 300 cells), shrunk.
With NUMBA_DISABLE_JIT=1, loss_and_grads raises
    NameError: name '_t' is not defined
in _backward_post (``delta_h_seq[_r, _k] += carry[_t]*scratch_P_h_prev__post[...]``).
A readout that reads ``h.prev`` directly is refused ("the readout node 'z' reads a
previous state"); through a product it is accepted and then breaks. Either outcome
below is a fix: the cell works, or it is refused with a message.
"""

from bpttgen.derive import Model, sse

EXPECT = "ok|refused"


def model():
    m = Model('cell', sizes=('V',))
    v_in = m.input('v1', 'V')
    s0 = m.state('h', 'V')
    W4 = m.matrix('W_5', 'V', 'V')
    m.update(s0, s0.prev)
    m.output(W4 @ s0.prev, loss=sse)
    return m
