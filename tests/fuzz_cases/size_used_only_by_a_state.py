"""A size that only a state has (no parameter, no input of that size).

Found by bench/fuzz.py (seed 2, cell 169), shrunk. Not refused as an unused size, but
forward() raises ``KeyError: 'V2'``: the module reads sizes off the parameters and the
input only, although state0 (or the trajectory) tells V2. Working or a refusal are
both fixes.
"""

from bpttgen import Model, sse

EXPECT = "ok|refused"


def model():
    m = Model('cell', sizes=('V2', 'V3'))
    v_in = m.input('v1', 'V3')
    s0 = m.state('h', 'V2')
    b = m.bias('b', 'V3')
    m.update(s0, s0.prev * 0.5)
    m.output(b + v_in, loss=sse)
    return m
