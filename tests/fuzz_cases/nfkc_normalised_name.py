"""A name that Python normalises (NFKC): 'ℌ' is the identifier H in generated code.

Found by bench/fuzz.py (seed 2, cells 211, 276: 'ℌ' and 'µ'), shrunk. forward() raises
``KeyError: 'ℌ_seq'``: the workspace is filled through identifiers (normalised to
``H_seq``) and read back through strings ('ℌ_seq'). 'µ' (U+00B5) becomes 'μ' (U+03BC)
the same way, and two such names can even become one variable. Working, or refusing a
name that is not NFKC-normalised, are both fixes.
"""

from bpttgen import Model, sse, tanh

EXPECT = "ok|refused"


def model():
    m = Model('cell', sizes=('V2',))
    v_in = m.input('ℌ', 'V2')
    s0 = m.state('h', 'V2')
    W = m.matrix('W', 'V2', 'V2')
    m.update(s0, tanh(W @ s0.prev + v_in))
    m.output(s0.t, loss=sse)
    return m
