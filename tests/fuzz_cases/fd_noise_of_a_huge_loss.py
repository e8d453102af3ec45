"""A state that squares itself each step (h = sqrt(1 + (1 + h_prev^2)^2)): the loss
reaches 1e5, and central differences of it carry ~1e-8 of rounding noise.

Found by bench/fuzz.py (seed 11, cell 314), shrunk: 7 elements of dW_12 "differed"
from finite differences by 1e-6 relative. Not a wrong gradient: W_12 does not reach
the loss, its gradient is exactly l2 * W_12 (bptt, naive, tbptt, epochwise, rtrl and
artbp agree), and an h-sweep of the five-point stencil converges to it. The fuzzer
now bounds the stencil's resolution by the loss's rounding, 16 eps |L| / h.
"""

import sympy

from bpttgen import Model, sse

a = sympy.Symbol("a", real=True)


def model():
    m = Model('cell', sizes=('V3', 'V4'))
    v_in = m.input('v1', 'V3')
    s0 = m.state('h', 'V4')
    s1 = m.state('v2', 'V3')
    s2 = m.state('q', 'V3')
    b3 = m.bias('b_4', 'V3')
    W11 = m.matrix('W_12', 'V3', 'V3')
    W13 = m.matrix('W_14', 'V3', 'V3')
    W17 = m.matrix('W_18', 'V4', 'V4')
    m.update(s0, m.expr(sympy.sqrt(1 + a**2), a=1 + s0.prev ** 2))
    m.update(s1, s1.prev + s1.prev)
    n2 = m.node('g2', s1.prev)
    m.update(s2, (1 - n2) * s2.prev + n2 * (W13 @ s1.prev + W11 @ s2.prev + b3))
    n3 = m.node('n2', 1.5 * s0.t)
    m.output(W17 @ n3, loss=sse, at='last')
    return m
