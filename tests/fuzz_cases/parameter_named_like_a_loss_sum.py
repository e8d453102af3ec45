"""A vector parameter named like a sum of the loss kernel ('S', the sse loss's sum).

Found by bench/fuzz.py (seed 28, cell 204), shrunk. The loss kernel took its float
type from `S.dtype.type`, at its top: render.define_float_type picked the first float
array whose name the kernel read, and the kernel reads its own local sum S. Compiled,
Numba failed to type the kernel; without JIT, forward() raised UnboundLocalError. The
float type now comes from an argument of the kernel (here z_seq).
"""

from bpttgen import Model, sse


def model():
    m = Model('cell', sizes=('V4',))
    v_in = m.input('v2', 'V4')
    s0 = m.state('h', 'V4')
    p0 = m.diagonal('S', 'V4')
    W4 = m.matrix('W_5', 'V4', 'V4')
    m.update(s0, s0.prev)
    m.output(W4 @ (p0 * v_in), loss=sse)
    return m
