"""Every identifier of generated code is either the model's own name, a name derived
from one by a prefix or suffix of derive/naming.py, or a name naming.py reserves for
the generated code in that scope; and the definition API refuses the names that would
clash. Adding a variable to a template without telling naming.py fails here."""

import ast
import os

import pytest

from bpttgen.codegen.generate import GENERATED_DIR
from bpttgen.derive import DefinitionError, Model, custom_loss, naming, sse, tanh
from bpttgen.derive.losses import LossError
from bpttgen.derive.models import BUILTIN, build

_MODULES = sorted(f for f in os.listdir(GENERATED_DIR)
                  if f.endswith(".py") and f != "__init__.py")


def _user_names(model):
    return set(model.sizes) | set(model._symbols) | {s.name for s, _ in model.loss.sums}


def _derived(name):
    return name.startswith(naming.DERIVED_PREFIXES) or name.endswith(naming.DERIVED_SUFFIXES)


def _identifiers(node):
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.arg):
            out.add(n.arg)
        elif isinstance(n, (ast.FunctionDef, ast.ClassDef)):
            out.add(n.name)
        elif isinstance(n, ast.alias):
            out.add(n.asname or n.name.split(".")[0])
    return out


def _scopes(tree):
    """{"loss" | "kernel" | "driver": identifiers} of one generated module."""
    scopes = {"loss": set(), "kernel": set(), "driver": set()}
    for n in tree.body:
        if isinstance(n, ast.FunctionDef):
            jit = any("jit" in ast.unparse(d) for d in n.decorator_list)
            scope = "loss" if n.name in ("_loss", "_loss_rows") else \
                "kernel" if jit else "driver"
        else:
            scope = "driver"
        scopes[scope] |= _identifiers(n)
    return scopes


@pytest.mark.parametrize("filename", _MODULES)
def test_generated_code_binds_only_known_names(filename):
    model = build(filename[:-3].removesuffix("_cuda"))
    with open(os.path.join(GENERATED_DIR, filename)) as f:
        scopes = _scopes(ast.parse(f.read()))
    own = _user_names(model)
    allowed = {
        "loss": naming.CALLED | naming.LOSS_LOCALS,
        "kernel": naming.CALLED | naming.KERNEL_LOCALS,
        "driver": naming.CALLED | naming.DRIVER_NAMES,
    }
    for scope, names in scopes.items():
        unknown = sorted(n for n in names - own - allowed[scope] if not _derived(n))
        assert not unknown, f"{filename}: {scope} code binds {unknown}: add to derive/naming.py"
    # Of the model's names, only sizes and vector parameters are variables of the
    # Python driver; others appear there only as a variable of the driver's own.
    vectors = {p.name for p in model.params.values() if p.kind == "vector"}
    assert (scopes["driver"] & own) - set(model.sizes) - vectors <= naming.DRIVER_NAMES


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_names_pass_the_checks(name):
    model = build(name)
    for n in _user_names(model) - {f"{s}_prev" for s in model.states}:
        kind = "size" if n in model.sizes else "node"
        assert naming.identifier_problem(n, kind) is None, n


@pytest.mark.parametrize("bad, why", [
    ("lambda", "keyword"), ("match", "keyword"), ("T", "generated code"),
    ("np", "generated code"), ("range", "generated code"), ("carry", "generated code"),
    ("d_h", "'d_'"), ("delta_h", "'d"), ("h_seq", "'_seq'"), ("P_x", "'P_'"),
    ("W_P_x", "'W_P_'"), ("_a", "'_'"), ("a__b", "double underscore"), ("g_dot", "'_dot'"),
])
def test_clashing_names_are_refused_at_their_line(bad, why):
    m = Model("cell", sizes=("I", "H"))
    with pytest.raises(DefinitionError, match=why) as err:
        m.diagonal(bad, "H")
    assert "test_naming.py" in str(err.value) and repr(bad) in str(err.value)


def test_a_size_may_not_be_a_driver_variable():
    for bad in ("T", "B", "x", "params", "sizes", "np", "m"):
        with pytest.raises(DefinitionError, match="size"):
            Model("cell", sizes=("I", bad))


def test_a_product_whose_name_would_clash_gets_a_private_name():
    """W @ v is the vector W_v unless that name would clash; then it is named in the
    generator's own namespace (a leading underscore) and the module still verifies."""
    from bpttgen.codegen.generate import verify
    from bpttgen.codegen.render import render_cpu
    from bpttgen.derive import derive

    m = Model("cell", sizes=("I", "H", "O"))
    x, h = m.input("x", "I"), m.state("h", "H")
    p = m.matrix("W_P", "H", "I") @ x  # W_P_x: the name of a stacked weight
    q = m.matrix("lambda_", "H", "H") @ h.prev  # lambda__h_prev: a double underscore
    assert (p.expr.name, q.expr.name) == ("_p1", "_p2")
    w = m.matrix("W", "H", "H")
    assert (w @ h.prev).expr.name == "W_h_prev"
    assert (w @ h.prev).expr.name == "W_h_prev"  # the same product twice: one vector
    m.update(h, tanh(p + q + w @ h.prev))
    m.output(m.matrix("V", "O", "H") @ h, loss=sse)
    verify("cell", render_cpu(derive(m), "test"))


def test_model_names_that_shadow_modules_are_refused():
    for bad in ("numpy", "math", "codegen", "class"):
        with pytest.raises(DefinitionError, match="model"):
            Model(bad, sizes=("I",))


def test_loss_sum_names_are_checked():
    import sympy as sp

    z, d = sp.symbols("z d")
    for bad in ("total", "m", "y", "lambda", "S_seq"):
        with pytest.raises(LossError, match="sum"):
            custom_loss("l", sp.Symbol(bad), **{bad: (z - d) ** 2})


def test_output_claiming_a_taken_z_says_which_call_claims_it():
    m = Model("cell", sizes=("I", "H", "O"))
    x, h = m.input("x", "I"), m.state("h", "H")
    m.update(h, tanh(m.matrix("W", "H", "I") @ x + m.matrix("U", "H", "H") @ h.prev))
    m.node("z", tanh(h))
    with pytest.raises(DefinitionError, match=r"output\(\) names the readout 'z'"):
        m.output(m.matrix("V", "O", "H") @ h, loss=sse)


def test_a_node_named_z_after_output_says_output_claimed_it():
    m = Model("cell", sizes=("I", "H", "O"))
    x, h = m.input("x", "I"), m.state("h", "H")
    m.update(h, tanh(m.matrix("W", "H", "I") @ x + m.matrix("U", "H", "H") @ h.prev))
    m.output(m.matrix("V", "O", "H") @ h, loss=sse)
    with pytest.raises(DefinitionError, match=r"readout, by output\(\)"):
        m.node("z", tanh(h))


def test_loss_sum_may_not_be_named_like_the_output_size():
    import sympy as sp

    z, d = sp.symbols("z d")
    loss = custom_loss("l", sp.Symbol("K2"), K2=(z - d) ** 2)
    m = Model("cell", sizes=("I", "H", "K2"))
    x, h = m.input("x", "I"), m.state("h", "H")
    m.update(h, tanh(m.matrix("W", "H", "I") @ x + m.matrix("U", "H", "H") @ h.prev))
    with pytest.raises(DefinitionError, match="sum named 'K2'"):
        m.output(m.matrix("V", "K2", "H") @ h, loss=loss)
