"""One matrix applied both to a product and to a plain vector, in the readout.

Found by bench/fuzz.py (seed 7, cell 15), shrunk. Every algorithm's gradient of W_7
differs from central finite differences of the module's own loss (relative error
~1, confirmed by the five-point stencil). Compare
matrix_shared_by_recurrence_and_input_path.py: a matrix used twice, one use on a
product of a product (``W @ (V @ x)``).
"""

from bpttgen.derive import Model, sse


def model():
    m = Model('cell', sizes=('V3',))
    v_in = m.input('v1', 'V3')
    s0 = m.state('h', 'V3')
    W1 = m.matrix('W_2', 'V3', 'V3')
    W6 = m.matrix('W_7', 'V3', 'V3')
    U = m.matrix('U', 'V3', 'V3')
    m.update(s0, U @ s0.prev + v_in)
    m.output(W6 @ (W1 @ v_in) + W6 @ s0.t, loss=sse)
    return m
