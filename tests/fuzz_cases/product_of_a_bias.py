"""A matrix product whose operand is a parameter vector: ``W @ b``.

Found by bench/fuzz.py's shrinker (a product's operand replaced by a plain vector,
here a bias) while shrinking a reverse-state cell of seed 20240601, cell 1; the same
happens without any reverse state, as here. With NUMBA_DISABLE_JIT=1, forward() raises
    NameError: name 'bs1_seq' is not defined
in _forward_pre (``np.dot(bs1_seq[_lo:_hi], W_P_bs1.T, P_bs1_seq[_lo:_hi])``): the
product is laid out as one of a per-step vector, which a parameter has no sequence of.
The same inside an update (``tanh(U @ h.prev + W @ b + x)``) fails alike. Fixed: Model._linear refuses a product of a vector that reads no input, state
or node, at the user's line (a constant: a bias says it).
"""

from bpttgen.derive import Model, sse

EXPECT = "refused"


def model():
    m = Model('cell', sizes=('V4',))
    v_in = m.input('v1', 'V4')
    s0 = m.state('v2', 'V4')
    W14 = m.matrix('W_15', 'V4', 'V4')
    b_s28 = m.bias('bs1', 'V4')
    m.update(s0, s0.prev)
    m.output(W14 @ b_s28, loss=sse)
    return m
