"""Abs applied to an expression with sigmoid (or softplus) in it.

Found by bench/fuzz.py (seed 0, cell 130), shrunk. derive/render refuse it with
"cannot print the function 're' as code": SymPy rewrites Abs(exp(sigmoid(b))) through
re(sigmoid(b)) because derive.functions.sigmoid does not say it is real.
"""

import sympy

from bpttgen.derive import Model, exp, sigmoid, sse


def model():
    m = Model('cell', sizes=('V4',))
    v_in = m.input('v1', 'V4')
    s0 = m.state('h', 'V4')
    b3 = m.bias('b_4', 'V4')
    W = m.matrix('W', 'V4', 'V4')
    n3 = m.node('n3', exp(sigmoid(b3 + s0.prev)).apply(sympy.Abs))
    m.update(s0, W @ n3)
    m.output(s0.t, loss=sse)
    return m
