"""A custom loss whose sum is named like a parameter of custom_loss.

Found by bench/fuzz.py (seed 0, cell 267; seed 1, cells 58 and 92), shrunk. The
definition itself fails with ``TypeError: custom_loss() got multiple values for
argument 'value'`` (sums named 'name', 'target', 'prediction' or 'description' do
the same or worse: a sum named 'prediction' silently becomes the prediction). A fix
accepts the name (e.g. name and value positional-only) or refuses it with a LossError.
"""

import sympy

from bpttgen.derive import Model, custom_loss, sse
from bpttgen.derive.losses import d, z

EXPECT = "ok|refused"

R1 = sympy.Symbol('value', real=True)
LOSS = custom_loss('fuzz_loss', sympy.log(1 + R1), target='vector', **{'value': (z - d)**2})


def model():
    m = Model('cell', sizes=('C',))
    v_in = m.input('v1', 'C')
    s0 = m.state('h', 'C')
    W = m.matrix('W', 'C', 'C')
    m.update(s0, W @ s0.prev + v_in)
    m.output(s0.t, loss=LOSS)
    return m
