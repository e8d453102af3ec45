"""Token inputs and embedding lookups (``m.tokens``, ``m.embedding``, ``E[x]``): the
refusals at the user's line, a cell that reads its lookups in every way a cell can
(elementwise, through a product, two tables on one input) checked against the unrolled
loss and finite differences, and the run time's handling of integer tokens (checks,
no cast to float, memory). The built-in embed_lstm runs every registry tier
(helpers.CASES) besides."""

import numpy as np
import pytest

from bpttgen.codegen.generate import module_sources
from bpttgen.codegen.runtime import calls
from bpttgen.derive import DefinitionError, Model, derive, reference, sse, tanh
from helpers import max_relative_error, random_problem, readme_blocks
from test_definitions import _located, _next_line
from unrolled import symbolic_loss_and_grads


def _token_model(name="tok", sizes=("V", "D", "H", "O")):
    m = Model(name, sizes=sizes)
    return m, m.tokens("x", vocab="V"), m.state("h", "H")


# -- refusals ------------------------------------------------------------------------
@pytest.mark.parametrize("misuse", [
    lambda m, x, E, W: x + 1,
    lambda m, x, E, W: 2 * x,
    lambda m, x, E, W: tanh(x),
    lambda m, x, E, W: m.matrix("W_x", "H", "V") @ x,
    lambda m, x, E, W: m.node("u", x),
], ids=["add", "scale", "tanh", "product", "node"])
def test_tokens_in_arithmetic_are_refused(misuse):
    m, x, h = _token_model()
    E, W = m.embedding("E", "D", "V"), m.matrix("W", "H", "D")
    with pytest.raises(DefinitionError) as info:
        misuse(m, x, E, W)
    msg = _located(info.value, misuse.__code__.co_firstlineno, __file__)  # the lambda's line
    assert "token input 'x' is an integer index" in msg and "E[x]" in msg


def test_lookup_of_a_vector_is_refused():
    m, x, h = _token_model()
    E = m.embedding("E", "H", "H")
    with pytest.raises(DefinitionError) as info:
        line = _next_line()
        E[h.prev]
    msg = _located(info.value, line, __file__)
    assert "indexed by the model's token input" in msg and "m.tokens" in msg


def test_indexing_a_plain_matrix_is_refused():
    m, x, h = _token_model()
    W = m.matrix("W", "D", "V")
    with pytest.raises(DefinitionError) as info:
        line = _next_line()
        W[x]
    msg = _located(info.value, line, __file__)
    assert "only an embedding table is indexed" in msg and "m.embedding('W', 'D', 'V')" in msg


def test_lookup_with_another_vocabulary_is_refused():
    m, x, h = _token_model()
    E = m.embedding("E", "V", "D")  # (V, D): the columns are D, not the vocabulary
    with pytest.raises(DefinitionError) as info:
        line = _next_line()
        E[x]
    msg = _located(info.value, line, __file__)
    assert "shape mismatch in 'E[x]'" in msg and "(V, D)" in msg and "vocab V" in msg


def test_tokens_are_the_one_input():
    m, x, h = _token_model()
    with pytest.raises(DefinitionError, match="token input .x., which is its only input"):
        m.input("u", "D")


# -- a cell that reads its lookups every way ------------------------------------------
def _varied():
    """Two tables on one input: E's column is read by a product and elementwise (its
    adjoint sums both), F's only elementwise; the readout is over the vocabulary."""
    m, x, h = _token_model("varied_tokens", sizes=("V", "H", "O"))
    e = m.embedding("E", "H", "V")[x]
    f = m.embedding("F", "H", "V")[x]
    W, U = m.matrix("W", "H", "H"), m.matrix("U", "H", "H")
    m.update(h, tanh(W @ e + U @ h.prev + e * f))
    m.output(m.matrix("W_y", "O", "H") @ h, loss=sse)
    return m


def test_varied_lookups_match_the_unrolled_loss():
    model = _varied()
    D = derive(model)
    sizes = {"V": 5, "H": 3, "O": 2}
    params, x, targets, state0 = random_problem(D, sizes, T=3, B=1)
    assert x.dtype.kind == "i" and x.shape == (3, 1)
    loss, grads = reference.loss_and_grads(D, params, x, targets, state0=state0, l2=0.1)
    sym_loss, sym_grads = symbolic_loss_and_grads(model, sizes, params, x, targets, state0,
                                                  l2=0.1)
    assert abs(loss - sym_loss) < 1e-12
    for name in params:
        assert max_relative_error(grads[name], sym_grads[name]) < 1e-10, name
    # a token never drawn leaves its column's gradient zero but for L2
    unused = sorted(set(range(sizes["V"])) - set(x.ravel().tolist()))
    for v in unused:
        np.testing.assert_allclose(grads["E"][:, v], 0.1 * params["E"][:, v])


def test_varied_lookups_generate_and_verify():
    """module_sources(check=True) runs the CPU module's every exact algorithm (BPTT,
    naive, TBPTT, RTRL...) as plain Python against finite differences."""
    sources = module_sources(_varied(), "pytest", target="all", check=True)
    cpu = sources["varied_tokens.py"]
    assert "crt.lookup(" in sources["varied_tokens_cuda.py"]
    assert "np.dot(" in cpu and "x_seq[_r]" in cpu  # a gather, then the products


# -- the run time ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def embed():
    from bpttgen.generated import embed_lstm

    return embed_lstm


def _params(module, dtype=np.float64):
    return module.init_params({"V": 7, "D": 3, "H": 4}, seed=0, dtype=dtype)


@pytest.mark.parametrize("x, kind, match", [
    (np.zeros((3, 2, 7)), ValueError, r"shape \(T, B\) of integer tokens"),
    (np.zeros((3, 2)), TypeError, "integer tokens in \\[0, V\\), got dtype float64"),
    (np.full((3, 2), 7), ValueError, r"token 7 at \(t, b\) = \(0, 0\), outside \[0, 7\)"),
    (np.full((3, 2), -1), ValueError, r"token -1 .* outside \[0, 7\)"),
    ([[0, 1]], TypeError, "numpy array of shape \\(T, B\\)"),
])
def test_check_data_refuses_bad_tokens(embed, x, kind, match):
    with pytest.raises(kind, match=match):
        calls.check_call(embed.SPEC, _params(embed), x, np.zeros((3, 2), np.int64))


def test_tokens_of_any_integer_dtype_give_one_gradient(embed):
    params = _params(embed)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 7, (4, 2))
    targets = rng.integers(0, 7, (4, 2))
    loss, grads = embed.loss_and_grads(params, x, targets)
    loss32, grads32 = embed.loss_and_grads(params, x.astype(np.int32), targets)
    want, wgrads = reference.loss_and_grads(derive(embed_model()), params, x, targets)
    assert loss == loss32 and abs(loss - want) < 1e-12
    for name in params:
        assert np.array_equal(grads[name], grads32[name])
        assert max_relative_error(grads[name], wgrads[name]) < 1e-10, name
    # checkpointed BPTT reads the tokens segment by segment, as integers
    _, cgrads = embed.loss_and_grads(params, x, targets, algorithm="checkpoint", segment=1)
    for name in params:
        assert max_relative_error(cgrads[name], grads[name]) < 1e-10, name


def embed_model():
    from bpttgen.derive.models import build

    return build("embed_lstm")


def test_trainer_keeps_tokens_integer(embed):
    """fit, fit_stream and predict take integer tokens as they are: a float cast
    would let a wrong input through, or round a token. (float64: the kernels the
    registry tiers compile.)"""
    rng = np.random.default_rng(0)
    text = rng.integers(0, 7, 361)
    x = text[:-1].reshape(-1, 9).T[:, :40].copy()  # (T=9, B=40) sequences
    y = text[1:].reshape(-1, 9).T[:, :40].copy()
    trainer = embed.Trainer({"V": 7, "D": 3, "H": 4}, optimizer="adam", lr=0.05,
                            dtype=np.float64, seed=0)
    history = trainer.fit(x, y, epochs=3, batch_size=20, progress=False)
    assert np.isfinite(history["loss"]).all()
    assert trainer.predict(x[:, :2]).shape == (9, 2, 7)
    streamed = embed.Trainer({"V": 7, "D": 3, "H": 4}, algorithm="tbptt", k1=2, k2=3,
                             dtype=np.float64, seed=0)
    streamed.fit_stream([(x[:4], y[:4]), (x[4:], y[4:])], progress=False)
    with pytest.raises(TypeError, match="integer tokens"):
        trainer.predict(x.astype(np.float64))


def test_memory_counts_a_token_as_an_int64(embed):
    sizes = {"V": 10000, "D": 8, "H": 8}
    assert calls.input_bytes(embed.SPEC, sizes, 4) == 8
    # the checkpointed plan's step holds B tokens of x, not B one-hot rows of V floats
    one = embed.memory(sizes, 64, 4, np.float32, "checkpoint", segment=8)
    assert one < embed.memory(sizes, 64, 4, np.float32, "bptt")


def test_readme_token_cell(tmp_path):
    """The README's token cell derives, and its generated module passes generate's
    check (every exact algorithm against finite differences, the kernels as Python)."""
    from bpttgen.derive.loader import load_model

    blocks, _ = readme_blocks()
    path = tmp_path / "cell_embed.py"
    path.write_text(blocks["cell_embed.py"])
    model = load_model(str(path))
    D = derive(model)
    assert D.tokens and [n.name for n in D.nodes if n.lookup] == ["E_x"]
    assert r"\mathbf{E}_{:,x_{t}}" in D.render("document")
    sources = module_sources(model, "pytest", target="cpu", check=True)
    assert "char_elman.py" in sources
