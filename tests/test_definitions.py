"""Bad definitions fail when they are made, with a DefinitionError (LossError for a
loss) whose message names the problem, the symbol, and the file:line of the
offending line: here, a line of this file (``_next_line()`` marks it)."""

import os
import sys
import textwrap

import pytest
import sympy

from bpttgen.derive import DefinitionError, Loss, Model, custom_loss, derive, sse, tanh
from bpttgen.derive.loader import load_model
from bpttgen.derive.losses import LossError, d, z
from bpttgen.derive.model import Vec

HERE = os.path.basename(__file__)


def _next_line():
    """The line number after the caller's: the offending line that follows."""
    return sys._getframe(1).f_lineno + 1


def _located(err, line, path=__file__):
    """The error names path:line, first in its message."""
    location = f"{path}:{line}"
    assert err.location is not None
    assert os.path.abspath(err.location.rsplit(":", 1)[0]) == os.path.abspath(path), err.location
    assert err.location.endswith(f":{line}"), (err.location, location)
    assert str(err).startswith(err.location + ": ")
    return str(err)


def _start(name="bad"):
    m = Model(name, sizes=("I", "H", "O"))
    return m, m.input("x", "I"), m.state("h", "H")


def _finish(m, x, h):
    m.update(h, tanh(m.matrix("W_xh", "H", "I") @ x + m.matrix("W_hh", "H", "H") @ h.prev))
    m.output(m.matrix("W_hy", "O", "H") @ h, loss=sse)
    return m


def test_a_good_definition_derives():
    """The control: the pieces the bad definitions below break are fine as such."""
    m, x, h = _start("good")
    D = derive(_finish(m, x, h))
    assert [n.name for n in D.nodes][-1] == "z"


def test_state_never_updated():
    m = Model("bad", sizes=("I", "H", "O"))
    x = m.input("x", "I")
    line = _next_line()
    s = m.state("s", "H")
    m.output(m.matrix("W", "O", "I") @ x, loss=sse)
    with pytest.raises(DefinitionError) as info:
        derive(m)
    msg = _located(info.value, line)
    assert "'s' is never updated" in msg and "m.update(s" in msg
    assert s.name == "s"


def test_matrix_vector_shape_mismatch():
    m, x, h = _start()
    W_hh = m.matrix("W_hh", "H", "H")
    with pytest.raises(DefinitionError) as info:
        line = _next_line()
        W_hh @ x
    msg = _located(info.value, line)
    assert "shape mismatch" in msg and "W_hh @ x" in msg and "(H, H)" in msg and "size I" in msg


def test_adding_vectors_of_different_sizes():
    m, x, h = _start()
    with pytest.raises(DefinitionError) as info:
        line = _next_line()
        x + h.prev
    msg = _located(info.value, line)
    assert "shape mismatch" in msg and "x + h_prev" in msg and "I and H" in msg


def test_update_with_a_vector_of_another_size():
    m, x, h = _start()
    with pytest.raises(DefinitionError) as info:
        line = _next_line()
        m.update(h, tanh(x))
    msg = _located(info.value, line)
    assert "shape mismatch" in msg and "'h'" in msg


def test_undefined_symbol_in_a_user_expression():
    m, x, h = _start()
    a, b = sympy.symbols("a b", real=True)
    with pytest.raises(DefinitionError) as info:
        line = _next_line()
        m.expr(sympy.log(sympy.exp(a) + sympy.exp(b)), a=x)
    msg = _located(info.value, line)
    assert "undefined symbol" in msg and "['b']" in msg


def test_a_loose_sympy_symbol_in_a_vector_expression():
    m, x, h = _start()
    with pytest.raises(DefinitionError) as info:
        line = _next_line()
        h.prev + sympy.Symbol("q")
    msg = _located(info.value, line)
    assert "'q'" in msg and "m.expr" in msg


@pytest.mark.parametrize("how", ["apply", "expr"])
def test_a_non_differentiable_function(how):
    m, x, h = _start()
    a = sympy.Symbol("a", real=True)
    with pytest.raises(DefinitionError) as info:
        if how == "apply":
            line = _next_line()
            h.prev.apply(sympy.floor)
        else:
            line = _next_line()
            m.expr(sympy.floor(a) * 2, a=h.prev)
    msg = _located(info.value, line)
    assert "not differentiable" in msg and "'floor'" in msg


def test_an_undefined_function():
    m, x, h = _start()
    f = sympy.Function("f")
    with pytest.raises(DefinitionError) as info:
        line = _next_line()
        m.update(h, h.prev.apply(f))
    msg = _located(info.value, line)
    assert "undefined function 'f'" in msg and "fdiff" in msg


def test_an_undefined_function_inside_a_vector_expression():
    """Written as an expression (not through apply), it is refused where used."""
    m, x, h = _start()
    f = sympy.Function("f")
    v = Vec(m, f(h.prev.expr), "H")
    with pytest.raises(DefinitionError) as info:
        line = _next_line()
        m.node("g", v)
    msg = _located(info.value, line)
    assert "undefined function 'f'" in msg and "'g'" in msg


def test_a_loss_that_is_not_scalar_custom_loss():
    S = sympy.Symbol("S")
    with pytest.raises(LossError) as info:
        line = _next_line()
        custom_loss("bad", S * z, S=(z - d) ** 2)
    msg = _located(info.value, line)
    assert "not scalar" in msg and "['z']" in msg and "'bad'" in msg


def test_a_loss_that_is_not_scalar_loss_class():
    S = sympy.Symbol("S", real=True)
    with pytest.raises(LossError) as info:
        line = _next_line()
        Loss("bad", "vector", ((S, (z - d) ** 2),), S + d, z)
    msg = _located(info.value, line)
    assert "not scalar" in msg and "['d']" in msg


def test_a_loss_with_an_unknown_symbol():
    S, q = sympy.symbols("S q")
    with pytest.raises(LossError) as info:
        line = _next_line()
        custom_loss("bad", S, S=(z - q) ** 2)
    msg = _located(info.value, line)
    assert "undefined symbol" in msg and "['q']" in msg


def test_a_custom_loss_may_spell_its_symbols_plainly():
    """Symbol('z') and Symbol('d') without assumptions are derive's z and d."""
    S, zz, dd = sympy.symbols("S z d")
    loss = custom_loss("plain", S / 2, S=(zz - dd) ** 2)
    assert loss.error() == sse.error()


@pytest.mark.parametrize("second", ["bias", "matrix", "node", "state_prev"])
def test_a_name_defined_twice(second):
    m, x, h = _start()
    first = _next_line()
    m.bias("b", "H")
    with pytest.raises(DefinitionError) as info:
        if second == "bias":
            line = _next_line()
            m.bias("b", "O")
        elif second == "matrix":
            line = _next_line()
            m.matrix("b", "H", "H")
        elif second == "node":
            line = _next_line()
            m.node("b", tanh(x))
        else:
            line = _next_line()
            m.bias("h_prev", "H")
    msg = _located(info.value, line)
    if second == "state_prev":
        assert "'h_prev'" in msg and "previous value of a state" in msg
    else:
        assert "'b' is already defined" in msg and f"{HERE}:{first}" in msg


def test_an_unknown_size():
    m, x, h = _start()
    with pytest.raises(DefinitionError) as info:
        line = _next_line()
        m.matrix("W", "H", "J")
    msg = _located(info.value, line)
    assert "'W'" in msg and "'J'" in msg and "sizes" in msg
    with pytest.raises(DefinitionError) as info:
        line = _next_line()
        m.state("s", "Q")
    msg = _located(info.value, line)
    assert "'s'" in msg and "'Q'" in msg


def test_a_parameter_declared_but_never_used():
    m, x, h = _start()
    line = _next_line()
    W_unused = m.matrix("W_unused", "H", "H")
    _finish(m, x, h)
    with pytest.raises(DefinitionError) as info:
        derive(m)
    msg = _located(info.value, line)
    assert "'W_unused'" in msg and "never used" in msg
    assert W_unused.name == "W_unused"


GOOD_FILE = '''\
from bpttgen.derive import Model, sse, tanh


def model():
    m = Model("from_file", sizes=("I", "H", "O"))
    x = m.input("x", "I")
    h = m.state("h", "H")
    m.update(h, tanh(m.matrix("W_xh", "H", "I") @ x + m.matrix("W_hh", "H", "H") @ h.prev))
    m.output(m.matrix("W_hy", "O", "H") @ h, loss=sse)
    return m
'''

#: (broken line of GOOD_FILE (1-based), replacement, words the message must hold)
BROKEN_FILES = {
    "syntax error": (8, "    m.update(h, tanh(m.matrix('W_xh', 'H', 'I') @ x +)",
                     ["syntax error"]),
    "name error": (8, "    m.update(h, tanhh(x))", ["NameError", "tanhh"]),
    "shape mismatch": (8, "    m.update(h, tanh(m.matrix('W_hh', 'H', 'H') @ x))",
                       ["shape mismatch", "W_hh @ x"]),
    "unused parameter": (9, "    m.output(m.matrix('W_hy', 'O', 'H') @ h, loss=sse); "
                            "m.bias('b_unused', 'H')", ["'b_unused'", "never used"]),
    "not scalar loss": (9, "    from bpttgen.derive.losses import custom_loss, z, d; "
                           "custom_loss('bad', z, S=(z - d) ** 2)", ["not scalar", "['z']"]),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FILES))
def test_a_broken_definition_file(tmp_path, case):
    line, text, words = BROKEN_FILES[case]
    lines = GOOD_FILE.splitlines()
    lines[line - 1] = text
    path = tmp_path / "cell.py"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises((DefinitionError, LossError)) as info:
        derive(load_model(str(path)))
    msg = _located(info.value, line, path=str(path))
    for word in words:
        assert word in msg, (word, msg)


def test_a_good_definition_file(tmp_path):
    path = tmp_path / "cell.py"
    path.write_text(GOOD_FILE)
    assert derive(load_model(str(path))).name == "from_file"


def test_a_definition_file_without_model(tmp_path):
    path = tmp_path / "empty.py"
    path.write_text(textwrap.dedent("""\
        import bpttgen.derive
        cell = None
    """))
    with pytest.raises(DefinitionError) as info:
        load_model(str(path))
    msg = _located(info.value, 1, path=str(path))
    assert "must define model()" in msg
