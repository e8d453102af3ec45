"""Several input vectors per step (``m.input`` called more than once): a cell that reads
three inputs every way a cell can (through products, elementwise, one input's size
told by no parameter) checked against the unrolled loss and finite differences; a
call's x as the inputs side by side or as a dict; the refusals, at the user's line or
naming the argument."""

import numpy as np
import pytest

from bpttgen.codegen.generate import module_sources
from bpttgen.codegen.runtime import calls
from bpttgen.derive import DefinitionError, Model, derive, reference, sigmoid, sse, tanh
from helpers import max_relative_error, random_problem, readme_blocks
from test_definitions import _located, _next_line
from unrolled import symbolic_loss_and_grads

SIZES = {"I": 3, "C": 2, "H": 4, "O": 2}


def _conditioned(name="conditioned"):
    """x through a product, c through a product and a gate, u (size H, told by the
    recurrent weight) elementwise; the readout reads c too."""
    m = Model(name, sizes=("I", "C", "H", "O"))
    x, c, u = m.input("x", "I"), m.input("c", "C"), m.input("u", "H")
    h = m.state("h", "H")
    W, U, V = m.matrix("W", "H", "I"), m.matrix("U", "H", "H"), m.matrix("V", "H", "C")
    gate = sigmoid(V @ c)
    m.update(h, tanh(W @ x + U @ h.prev + m.bias("b", "H")) * gate + 0.5 * u * h.prev)
    m.output(m.matrix("W_y", "O", "H") @ h + m.matrix("W_c", "O", "C") @ c, loss=sse)
    return m


def test_several_inputs_match_the_unrolled_loss():
    model = _conditioned()
    D = derive(model)
    assert D.inputs == (("x", "I"), ("c", "C"), ("u", "H"))
    params, x, targets, state0 = random_problem(D, SIZES, T=3, B=1)
    assert x.shape == (3, 1, 3 + 2 + 4)  # side by side, in the order declared
    loss, grads = reference.loss_and_grads(D, params, x, targets, state0=state0, l2=0.1)
    sym_loss, sym_grads = symbolic_loss_and_grads(model, SIZES, params, x, targets, state0,
                                                  l2=0.1)
    assert abs(loss - sym_loss) < 1e-12
    for name in params:
        assert max_relative_error(grads[name], sym_grads[name]) < 1e-10, name


def test_several_inputs_generate_and_verify():
    """module_sources(check=True) runs the CPU module's every exact algorithm (BPTT,
    naive, TBPTT, RTRL...) as plain Python against finite differences; each input is
    an array of its own in both modules, and the LaTeX lists all three."""
    model = _conditioned()
    sources = module_sources(model, "pytest", target="all", check=True)
    for name in ("conditioned.py", "conditioned_cuda.py"):
        assert "\"inputs\": (('x', 'I'), ('c', 'C'), ('u', 'H'))" in sources[name]
        assert 'inputs=["x_seq", "c_seq", "u_seq"]' in sources[name]
    latex = derive(model).render("document")
    assert r"maps the inputs $\mathbf{x}_{t}$, $\mathbf{c}_{t}$, $\mathbf{u}_{t}$" in latex


@pytest.fixture(scope="module")
def conditioned(tmp_path_factory):
    """The cell's CPU module, its kernels run as Python (the numbers are the test's;
    Numba's typing of an input array is the one-input models')."""
    import numba

    from bpttgen.codegen.generate import generate, import_path

    folder = tmp_path_factory.mktemp("inputs")
    path, = generate(_conditioned(), str(folder), "pytest", target="cpu", check=False)
    numba.config.DISABLE_JIT = True  # as generate's verify: the kernels as plain Python
    try:
        return import_path(path, "bpttgen_test_conditioned")
    finally:
        numba.config.DISABLE_JIT = False


def _problem(module, seed=0):
    rng = np.random.default_rng(seed)
    params = module.init_params(SIZES, seed=seed, dtype=np.float64)
    T, B = 4, 2
    parts = {name: rng.normal(0, 1, (T, B, SIZES[size])) for name, size in module.SPEC["inputs"]}
    return params, parts, rng.normal(0, 1, (T, B, SIZES["O"]))


def test_dict_and_side_by_side_give_one_gradient(conditioned):
    params, parts, targets = _problem(conditioned)
    packed = np.concatenate([parts["x"], parts["c"], parts["u"]], axis=2)
    D = derive(_conditioned())
    ref_loss, ref = reference.loss_and_grads(D, params, packed, targets)
    for x in (packed, dict(reversed(parts.items()))):  # a dict in any key order
        for algorithm in ("bptt", "checkpoint"):
            loss, grads = conditioned.loss_and_grads(params, x, targets, algorithm=algorithm)
            assert abs(loss - ref_loss) < 1e-12 * abs(ref_loss)
            for name in params:
                assert max_relative_error(grads[name], ref[name]) < 1e-12, (name, algorithm)
    y, final = conditioned.forward(params, parts)
    np.testing.assert_allclose(y, reference.forward(D, params, packed)[0], rtol=1e-12)


@pytest.mark.parametrize("edit, kind, match", [
    (lambda p: {"x": p["x"], "c": p["c"]}, ValueError,
     r"x must have the keys \['x', 'c', 'u'\] \(the model's inputs\), got \['x', 'c'\]"),
    (lambda p: dict(p, c=p["c"][:3]), ValueError,
     r"x\['c'\] has shape \(3, 2, 2\) .* must share \(T, B\)"),
    (lambda p: dict(p, u=p["u"][:, :, :3]), ValueError,
     r"x has shape \(4, 2, 8\), expected \(T, B, I=3 \+ C=2 \+ H=4\) \(the inputs "
     r"\['x', 'c', 'u'\] side by side\)"),
    (lambda p: dict(p, u=p["u"].tolist()), ValueError, r"x\['u'\] must be a numpy array"),
], ids=["missing", "steps", "width", "list"])
def test_bad_inputs_are_refused_by_name(conditioned, edit, kind, match):
    params, parts, targets = _problem(conditioned)
    with pytest.raises(kind, match=match):
        conditioned.loss_and_grads(params, edit(parts), targets)


def test_the_width_tells_one_untold_size():
    """The inputs' sizes that no parameter has: x's width tells one (the runtime
    solves for it), two are refused where the model is derived."""
    spec = {"inputs": (("x", "I"), ("c", "C"), ("d", "C"))}
    sizes = {"I": 3}
    assert calls._check_vectors(spec, sizes, np.float64, np.zeros((2, 1, 7))) == (2, 1)
    assert sizes == {"I": 3, "C": 2}
    with pytest.raises(ValueError, match=r"expected \(T, B, I=3 \+ C \+ C\)"):
        calls._check_vectors(spec, {"I": 3}, np.float64, np.zeros((2, 1, 6)))

    m = Model("two_untold", sizes=("I", "C", "H"))
    x, c, h = m.input("x", "I"), m.input("c", "C"), m.state("h", "H")
    m.update(h, tanh(m.matrix("U", "H", "H") @ h.prev) + m.sum(x) + m.sum(c))
    m.output(h, loss=sse)
    with pytest.raises(DefinitionError, match=r"the sizes \['C', 'I'\] of the inputs "
                                              r"\['x', 'c'\] are sizes of no parameter"):
        derive(m)


def test_tokens_and_vectors_together_are_refused():
    m = Model("mixed", sizes=("V", "D", "H"))
    m.input("u", "D")
    with pytest.raises(DefinitionError) as info:
        line = _next_line()
        m.tokens("x", vocab="V")
    msg = _located(info.value, line, __file__)
    assert "a token input is its model's only input" in msg and "['u']" in msg


def test_trainer_takes_a_dict(conditioned):
    """Trainer.fit and predict with x a dict: the same run as with x side by side."""
    _, parts, targets = _problem(conditioned)
    packed = np.concatenate([parts["x"], parts["c"], parts["u"]], axis=2)
    runs = []
    for x in (parts, packed):
        trainer = conditioned.Trainer(SIZES, lr=0.1, dtype=np.float64, seed=3)
        history = trainer.fit(x, targets, epochs=2, batch_size=1, progress=False)
        runs.append((history["loss"], trainer.params, trainer.predict(x)))
    (loss_a, params_a, y_a), (loss_b, params_b, y_b) = runs
    assert loss_a == loss_b and loss_a[1] < loss_a[0]
    for name in params_a:
        np.testing.assert_array_equal(params_a[name], params_b[name])
    np.testing.assert_array_equal(y_a, y_b)


def test_readme_conditioned_cell(tmp_path):
    """The README's cell of two inputs derives and passes generate's check; the
    command line's training says it feeds one input."""
    from bpttgen.codegen.app import cli
    from bpttgen.derive.loader import load_model

    blocks, _ = readme_blocks()
    path = tmp_path / "cell_cond.py"
    path.write_text(blocks["cell_cond.py"])
    model = load_model(str(path))
    assert derive(model).inputs == (("x", "I"), ("c", "C"))
    assert "cond_elman.py" in module_sources(model, "pytest", target="cpu", check=True)
    with pytest.raises(cli.UsageError, match=r"reads 2 inputs \['x', 'c'\]; the tasks and "
                                             r"--text give one"):
        cli._load_task(cli.parser().parse_args(["train", str(path)]), _Spec(model))


class _Spec:
    """What _load_task reads of a generated module."""

    def __init__(self, model):
        D = derive(model)
        self.NAME, self.SPEC = D.name, {"inputs": D.inputs, "target": "vector"}
