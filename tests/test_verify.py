"""``bpttgen generate`` checks a module's gradients before it writes it, and the
generator assumes no name of a built-in: an input not called x, an output size not
called O, sizes with long names. The kernels run as plain Python here (verify()
imports them with Numba's JIT off), so these tests compile nothing."""

import os
import textwrap

import pytest

from bpttgen.codegen.app import cli
from bpttgen.codegen.generate import VerificationFailed, verify
from bpttgen.codegen.render import render_cpu
from bpttgen.derive import Model, derive, sigmoid, sse, tanh


def _unusual_names():
    """No I, H, O, x: an input u, a node named x, an output size Out (regression:
    rtrl raised NameError: name 'O' is not defined)."""
    m = Model("unusual", sizes=("In", "Hid", "Out"))
    u, h = m.input("u", "In"), m.state("h", "Hid")
    x = m.node("x", sigmoid(m.matrix("W", "Hid", "In") @ u + m.bias("b", "Hid")))
    m.update(h, tanh(x * (m.matrix("U", "Hid", "Hid") @ h.prev)))
    m.output(m.matrix("V", "Out", "Hid") @ h, loss=sse)
    return m


def test_a_model_with_no_builtin_names_passes_every_algorithm():
    verify("unusual", render_cpu(derive(_unusual_names()), "test"))


def test_a_wrong_derivative_is_refused_naming_the_parameters():
    source = render_cpu(derive(_unusual_names()), "test")
    # Break the backward of the state update: tanh' = 1 - h^2 becomes 1 - h.
    assert source.count("_T(1) - h*h") >= 1
    broken = source.replace("_T(1) - h*h", "_T(1) - h")
    with pytest.raises(VerificationFailed, match=r"refusing to write unusual\.py.*\bU\b"):
        verify("unusual", broken)


def test_a_module_that_does_not_import_is_refused():
    with pytest.raises(VerificationFailed, match="does not import"):
        verify("broken", "def f(:\n")


def _write(tmp_path, body):
    path = tmp_path / "cell_def.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_generate_refuses_a_keyword_name_at_its_line(tmp_path, capsys):
    path = _write(tmp_path, """\
        from bpttgen.derive import Model, sse, tanh

        def model():
            m = Model("kw", sizes=("I", "H", "O"))
            x, h = m.input("x", "I"), m.state("h", "H")
            lam = m.diagonal("lambda", "H")
            m.update(h, tanh(m.matrix("W", "H", "I") @ x + lam * h.prev))
            m.output(m.matrix("V", "O", "H") @ h, loss=sse)
            return m
        """)
    rc = cli.main(["generate", path, "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_USAGE
    assert "cell_def.py:6" in err and "'lambda' is a Python keyword" in err
    assert "Traceback" not in err
    assert not os.path.exists(tmp_path / "out" / "kw.py")


def test_generate_checks_then_writes(tmp_path, capsys):
    path = _write(tmp_path, """\
        from bpttgen.derive import Model, max, sqrt, sse, tanh

        def model():
            m = Model("ok", sizes=("I", "H", "O"))
            x, h = m.input("x", "I"), m.state("h", "H")
            a = m.node("a", m.matrix("W", "H", "I") @ x + m.matrix("U", "H", "H") @ h.prev)
            m.update(h, tanh(a / (1 + a * a)) + max(a, -1) * 0.1 + sqrt(1 + h.prev * h.prev))
            m.output(m.matrix("V", "O", "H") @ h, loss=sse)
            return m
        """)
    rc = cli.main(["generate", path, "-o", str(tmp_path)])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "ok.py").exists()


def test_verify_leaves_the_run_time_compiled(tmp_path):
    """verify() turns Numba's JIT off while it imports the new module; the run time
    that module imports must still be compiled afterwards (a fresh process, where
    generate() is the first to import it)."""
    import subprocess
    import sys

    code = (
        "from bpttgen.derive.models import build\n"
        "from bpttgen.codegen.generate import generate, import_path\n"
        f"path, = generate(build('elman'), {str(tmp_path)!r}, 'test')\n"
        "m = import_path(path, 'elman_after_verify')\n"
        "from bpttgen.codegen.runtime import kernel_functions as kf\n"
        "print(type(m._run).__name__, type(kf._sigmoid_f64).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=600).stdout.split()  # timeout: a hang only
    assert out == ["CPUDispatcher", "CPUDispatcher"]
