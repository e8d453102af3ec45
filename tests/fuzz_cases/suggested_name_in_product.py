"""A matrix named as the refusal of a keyword suggests ('lambda_'), used in a product.

Found by bench/fuzz.py (seed 1, cells 30, 105, 205, 325). Naming a matrix 'lambda' is
refused with "(e.g. 'lambda_' would do)"; a matrix 'lambda_' is accepted, but
``lambda_ @ c`` is then refused: "the product lambda_ @ c is a vector named
'lambda__c', and 'lambda__c' has a double underscore". The same happens to accepted
names in other products: ``W_2 @ rows`` ('W_2_rows' ends with '_rows'),
``a_1_ @ c``. A fix names products so that accepted names always combine.
"""

from bpttgen import Model, sse, tanh


def model():
    m = Model('cell', sizes=('I', 'H'))
    v_in = m.input('x', 'I')
    c = m.state('c', 'H')
    rows = m.node('rows', tanh(m.matrix('W_1', 'H', 'I') @ v_in))
    m.update(c, tanh(m.matrix('lambda_', 'H', 'H') @ c.prev + m.matrix('W_2', 'H', 'H') @ rows))
    m.output(c.t, loss=sse)
    return m
