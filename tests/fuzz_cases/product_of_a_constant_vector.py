"""A matrix product of a vector SymPy simplifies to a constant: ``W @ exp(x - x)``.

Found by bench/fuzz.py (seed 3, cell 239: a token cell, ``W @ exp(v_in - v_in)`` with
v_in = E[x]), shrunk; the same with a dense input, as here. exp(x - x) becomes the
constant 1 (``u1 = 1`` in the step), and with NUMBA_DISABLE_JIT=1
loss_and_grads(algorithm='bptt') raises
    IndexError: index 2 is out of bounds for axis 1 with size 2
in _backward_loop (``u1 = u1_seq[_r, _k]`` with _k over V3, the product's rows, not
Y, u1's size: ``d_P_u1_seq[_r, _k] += delta_q*u1``). Fixed: Model._linear refuses a product of a vector that reads no input, state
or node, at the user's line (a constant: a bias says it).
"""

from bpttgen import Model, exp, sse

EXPECT = "refused"


def model():
    m = Model('cell', sizes=('Y', 'V3'))
    v_in = m.input('u', 'Y')
    s0 = m.state('q', 'V3')
    W10 = m.matrix('W_11', 'V3', 'Y')
    b_s3 = m.bias('bs0', 'Y')
    m.update(s0, W10 @ exp(v_in - v_in))
    m.output(b_s3 + m.matrix('V', 'Y', 'V3') @ s0, loss=sse)
    return m
