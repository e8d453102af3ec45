"""A custom loss named '\"\"\"' (free text that reaches the generated docstrings).

Found by bench/fuzz.py (seed 10, cell 1200), shrunk. The generated module did not
import (SyntaxError: the name closed the docstring it was printed in); names are now
escaped for docstrings (codegen/render.py docstring_text).
"""

import sympy

from bpttgen import Model, custom_loss
from bpttgen.derive.losses import d, z

R1 = sympy.Symbol('S', real=True)
LOSS = custom_loss('"""', R1, target='vector', S=(z - d)**2 / (1 + d**2)**2)


def model():
    m = Model('cell', sizes=('I', 'H', 'O'))
    v_in = m.input('x', 'I')
    s0 = m.state('h', 'H')
    W0 = m.matrix('W_1', 'H', 'H')
    W1 = m.matrix('W_2', 'H', 'I')
    W2 = m.matrix('W_3', 'O', 'H')
    m.update(s0, W0 @ s0.prev + W1 @ v_in)
    m.output(W2 @ s0.t, loss=LOSS)
    return m
