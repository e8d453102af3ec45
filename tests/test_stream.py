"""Training on a stream (codegen/runtime/stream.py): chunks of any lengths give the
updates of the whole sequence in memory, the engine holds a bounded number of steps
whatever the length, and a stream stopped, saved and loaded resumes exactly."""

import numpy as np
import pytest

SIZES = dict(I=3, H=4, O=3)
OPTIONS = [("tbptt", dict(k1=4, k2=9)), ("tbptt", dict(k1=5, k2=5)),
           ("tbptt", dict(k1=3, k2=20)), ("rtrl", dict(every=4))]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    T, B = 57, 3
    x = rng.normal(size=(T, B, 3))
    targets = rng.integers(0, 3, (T, B))
    mask = rng.uniform(0.5, 1.5, (T, B))
    mask[5:20] = 0  # windows without a loss term
    cuts = [0, 1, 8, 9, 30, 31, 50, T]  # chunks of 1 to 21 steps
    chunks = [(x[a:b], targets[a:b], mask[a:b]) for a, b in zip(cuts, cuts[1:])]
    return x, targets, mask, chunks


def trainer(algorithm, kw):
    from bpttgen.generated import elman

    return elman.Trainer(SIZES, dtype=np.float64, algorithm=algorithm, lr=0.1, **kw)


@pytest.mark.parametrize("algorithm, kw", OPTIONS)
def test_a_stream_takes_the_updates_of_the_sequence(data, algorithm, kw):
    x, targets, mask, chunks = data
    whole = trainer(algorithm, kw)
    loss = whole.step(x, targets, mask)
    held = []
    streamed = trainer(algorithm, kw)
    assert streamed.fit_stream(iter(chunks), progress=False, callback=lambda t, info:
                               held.append(t.stream.held_steps)) == loss
    assert streamed.steps == whole.steps > 1
    for p in whole.params:
        np.testing.assert_array_equal(streamed.params[p], whole.params[p])
    bound = 2 * kw["k1"] + kw["k2"] if algorithm == "tbptt" else kw["every"]
    assert max(held) < bound, held  # never the whole sequence
    assert streamed.history["loss"] == [loss] and streamed.stream is None


def test_artbp_streams_its_cuts(data):
    """ARTBP draws each chunk's cuts from (seed, update count): one chunk is step();
    chunked, the stretches between cuts are held, and their mean length is 1/c."""
    x, targets, mask, chunks = data
    whole, one = trainer("artbp", dict(c=0.2)), trainer("artbp", dict(c=0.2))
    loss = whole.step(x, targets, mask)
    assert one.fit_stream(iter([(x, targets, mask)]), progress=False) == loss
    for p in whole.params:
        np.testing.assert_array_equal(one.params[p], whole.params[p])
    streamed = trainer("artbp", dict(c=0.2))
    streamed.fit_stream(iter(chunks), progress=False)
    assert streamed.steps > 3
    with pytest.raises(ValueError, match="a stream's ARTBP needs c a number"):
        trainer("artbp", dict(c=np.full(57, 0.2))).fit_stream(iter(chunks), progress=False)


@pytest.mark.parametrize("algorithm, kw", OPTIONS + [("artbp", dict(c=0.2))])
def test_a_stopped_stream_resumes_exactly(data, tmp_path, algorithm, kw):
    x, targets, mask, chunks = data
    whole = trainer(algorithm, kw)
    whole.fit_stream(iter(chunks), progress=False)
    stopped = trainer(algorithm, kw)
    stopped.fit_stream(iter(chunks), progress=False,
                       callback=lambda t, info: info["steps"] >= 30)
    stopped.save(tmp_path / "stream.npz")
    resumed = trainer(algorithm, kw).load(tmp_path / "stream.npz")
    at = resumed.stream.pos
    assert at == 30
    rest = [c for c, a in zip(chunks, np.cumsum([0] + [len(c[0]) for c in chunks]))
            if a >= at]
    assert resumed.fit_stream(iter(rest), progress=False, resume=True) == \
        whole.history["loss"][-1]
    for p in whole.params:
        np.testing.assert_array_equal(resumed.params[p], whole.params[p])


def test_a_stream_refuses_what_needs_the_whole_sequence(data):
    with pytest.raises(ValueError, match="a stream trains with algorithm 'tbptt', 'rtrl' or"):
        trainer("bptt", {}).fit_stream(iter(data[3]), progress=False)
    with pytest.raises(TypeError, match=r"each chunk must be a tuple \(x, targets\)"):
        trainer("tbptt", dict(k1=2, k2=2)).fit_stream(iter([data[0]]), progress=False)
