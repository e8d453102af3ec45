"""A custom-loss sum named 'target' (an option of custom_loss).

Found by bench/fuzz.py (seed 1, cells 167, 339). Passed together with target='vector',
Python itself refuses the call ("got multiple values for keyword argument 'target'")
before custom_loss runs, so the fuzzer no longer draws option names for sums. Alone,
the sum binds to the option, and custom_loss refuses it with a LossError: an
expression is not a target kind. (A sum named 'prediction' is refused the same way:
the value then uses an undefined symbol, and the message says it is an option.)
"""

import sympy

from bpttgen import Model, custom_loss, sse
from bpttgen.derive.losses import d, z

EXPECT = "ok|refused"

R1 = sympy.Symbol('target', real=True)
LOSS = custom_loss('fuzz_loss', sympy.log(1 + R1), **{'target': (z - d)**2})


def model():
    m = Model('cell', sizes=('C',))
    v_in = m.input('v1', 'C')
    s0 = m.state('h', 'C')
    W = m.matrix('W', 'C', 'C')
    m.update(s0, W @ s0.prev + v_in)
    m.output(s0.t, loss=LOSS)
    return m
