"""A call's batch split over threads (codegen/runtime/split.py): the same loss and
gradients as the whole batch in one thread, for any split, mask and algorithm; the
rule that decides a split by sizes; the BLAS's threads given back."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpttgen.codegen.runtime import split
from bpttgen.derive.models import BUILTIN

from helpers import random_problem, tiny_sizes

#: one of each kind of call: two states (lstm), tokens (embed_lstm), a reverse state
#: (bielman), float targets (elman-sse)
CASES = ("elman", "lstm", "embed_lstm", "bielman", "elman-sse")
OPTIONS = {"bptt": {}, "epochwise": {}, "naive": {}, "tbptt": dict(k1=2, k2=3)}


@pytest.fixture(scope="module")
def derivations():
    from bpttgen.derive import derive

    from helpers import CASES as ALL

    return {case: derive(ALL[case]()) for case in CASES}


@pytest.mark.parametrize("case", CASES)
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_a_split_call_equals_the_whole_batch(generated_module, derivations, case, data):
    """threads=n against threads=1, float64: equal to rounding (1e-12) for any n, any
    mask (pieces without loss terms are left out), state0 and L2, every algorithm."""
    module = generated_module(case)
    algorithm = data.draw(st.sampled_from([a for a in OPTIONS if a in module.ALGORITHMS]))
    B = data.draw(st.integers(2, 7), label="B")
    n = data.draw(st.integers(2, B + 1), label="threads")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    D = derivations[case]
    params, x, targets, state0 = random_problem(D, tiny_sizes(D), T=5, B=B, seed=seed)
    rng = np.random.default_rng(seed)
    mask = rng.random((5, B)) < data.draw(st.sampled_from([0.3, 0.7, 1.0]))
    mask[:, rng.integers(0, B)] = False  # a column, maybe a whole piece, without loss
    mask[-1, rng.integers(0, B)] = True  # some loss term (a last-step loss reads t = T-1)
    kw = dict(state0=state0, mask=mask, l2=0.05, algorithm=algorithm, **OPTIONS[algorithm])
    loss1, grads1 = module.loss_and_grads(params, x, targets, threads=1, **kw)
    loss_n, grads_n = module.loss_and_grads(params, x, targets, threads=n, **kw)
    assert loss_n == pytest.approx(loss1, rel=1e-12, abs=1e-14)
    assert grads_n.keys() == grads1.keys()
    for name in grads1:
        scale = max(np.abs(grads1[name]).max(), 1e-300)
        assert np.abs(grads_n[name] - grads1[name]).max() / scale < 1e-12, name


@pytest.mark.parametrize("case", CASES)
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_a_split_forward_equals_the_whole_batch(generated_module, derivations, case, data):
    """forward(threads=n) and loss(threads=n) against threads=1, float64: predictions
    and final states (a reverse state's is at t = 0) in the batch's order, and the
    loss, equal to rounding (1e-12)."""
    module = generated_module(case)
    B = data.draw(st.integers(2, 7), label="B")
    n = data.draw(st.integers(2, B + 1), label="threads")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    D = derivations[case]
    params, x, _, state0 = random_problem(D, tiny_sizes(D), T=5, B=B, seed=seed)
    if data.draw(st.booleans(), label="no state0"):
        state0 = None
    targets = random_problem(D, tiny_sizes(D), T=5, B=B, seed=seed)[2]
    loss1 = module.loss(params, x, targets, state0=state0, l2=0.05, threads=1)
    loss_n = module.loss(params, x, targets, state0=state0, l2=0.05, threads=n)
    assert loss_n == pytest.approx(loss1, rel=1e-12, abs=1e-14)
    y1, final1 = module.forward(params, x, state0=state0, threads=1)
    y_n, final_n = module.forward(params, x, state0=state0, threads=n)
    assert y_n.shape == y1.shape
    assert np.abs(y_n - y1).max() <= 1e-12 * max(np.abs(y1).max(), 1e-300)
    assert final_n.keys() == final1.keys()
    for s in final1:
        assert final_n[s].shape == final1[s].shape
        assert np.abs(final_n[s] - final1[s]).max() <= 1e-12 * max(np.abs(final1[s]).max(), 1)


def test_threads_refuses_what_it_cannot_split(generated_module, derivations):
    module = generated_module("elman")
    D = derivations["elman"]
    params, x, targets, _ = random_problem(D, tiny_sizes(D), T=5, B=4)
    with pytest.raises(ValueError, match="threads=2 splits the batch of"):
        module.loss_and_grads(params, x, targets, algorithm="artbp", c=0.5, seed=0,
                              threads=2)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="threads must be a positive integer"):
            module.loss_and_grads(params, x, targets, threads=bad)
        with pytest.raises(ValueError, match="threads must be a positive integer"):
            module.forward(params, x, threads=bad)
    with pytest.raises(ValueError, match="k1 and k2"):  # before any thread starts
        module.loss_and_grads(params, x, targets, algorithm="tbptt", threads=2)
    with pytest.raises(ValueError, match="mask selects no loss term"):
        module.loss_and_grads(params, x, targets, mask=np.zeros((5, 4), bool), threads=2)


def test_the_rule_splits_mid_sizes_only(monkeypatch):
    """By sizes: rows and work enough per thread, loop weights that stay in a core's
    cache, an algorithm whose gradient is a sum over sequences."""
    monkeypatch.delenv("BPTTGEN_THREADS", raising=False)
    monkeypatch.setattr(split, "available", lambda: 2)
    lstm_mid = dict(loop_weight_bytes=4 * 512 * 128, parameters=512 * 192 + 64 * 128)
    assert split.count(None, "bptt", 128, 32, **lstm_mid) == 2
    assert split.count(None, "tbptt", 128, 32, **lstm_mid) == 2
    assert split.count(None, "bptt", 128, 31, **lstm_mid) == 1  # 15 rows a thread
    assert split.count(None, "artbp", 128, 32, **lstm_mid) == 1
    assert split.count(None, "bptt", 1, 32, **lstm_mid) == 1  # too little work
    assert split.count(None, "bptt", 128, 32, loop_weight_bytes=4 * 64 * 64,
                       parameters=6144) == 1  # Elman (32,128,16,64,16): 3 ms a call
    assert split.count(None, "bptt", 4, 64, **lstm_mid) == 1  # work for one thread only
    assert split.count(None, "bptt", 128, 64, loop_weight_bytes=4 * 2048 * 512,
                       parameters=2048 * 768) == 1  # weights beyond the cache
    monkeypatch.setattr(split, "available", lambda: 4)
    assert split.count(None, "bptt", 128, 64, **lstm_mid) == 4
    assert split.count(None, "bptt", 128, 48, **lstm_mid) == 3  # 16 rows each
    assert split.count(None, "bptt", 16, 64, **lstm_mid) == 3  # 2^25 work each: not 4
    monkeypatch.setattr(split, "available", lambda: 1)  # a Dask worker's one BLAS thread
    assert split.count(None, "bptt", 128, 32, **lstm_mid) == 1
    assert split.count(3, "bptt", 1, 2, 0, 0) == 2  # as asked, at most B
    assert split.count(np.int64(2), "bptt", 1, 8, 0, 0) == 2
    monkeypatch.setenv("BPTTGEN_THREADS", "1")
    monkeypatch.setattr(split, "available", lambda: 2)
    assert split.count(None, "bptt", 128, 32, **lstm_mid) == 1
    assert split.count(2, "bptt", 128, 32, **lstm_mid) == 2  # the argument wins
    monkeypatch.setenv("BPTTGEN_THREADS", "3")
    assert split.count(None, "bptt", 1, 2, **lstm_mid) == 2  # at most B, no size rule
    assert split.count(None, "artbp", 128, 32, **lstm_mid) == 1  # a default, not a demand
    for bad in ("many", "0", "-2"):
        monkeypatch.setenv("BPTTGEN_THREADS", bad)
        with pytest.raises(ValueError, match="BPTTGEN_THREADS must be a positive integer"):
            split.count(None, "bptt", 128, 32, **lstm_mid)


def test_a_forward_counts_a_third_of_a_calls_work(generated_module, monkeypatch):
    """At (B,T,I,H,O) = (32,128,64,128,64) on 2 threads: the Elman net's whole call
    splits and its forward (a third of the work: 2^24.4 a thread) does not; the LSTM's
    forward, with 3.2x the parameters, splits too."""
    monkeypatch.delenv("BPTTGEN_THREADS", raising=False)
    monkeypatch.setattr(split, "available", lambda: 2)
    for name, forward_splits in (("elman", False), ("lstm", True)):
        module = generated_module(name)
        params = module.init_params(dict(zip(module.SIZES, (64, 128, 64))), dtype=np.float32)
        assert module._MODEL.pieces(params, 128, 32, np.float32) == 2
        assert module._MODEL.pieces(params, 128, 32, np.float32, forward=True) == \
            (2 if forward_splits else 1), name


def _blas_threads():
    return [c.num_threads for c in split._blas_controller().lib_controllers]


def test_the_blas_gets_its_threads_back_even_when_a_piece_fails():
    before = _blas_threads()

    def fails():
        raise RuntimeError("a piece failed")

    seen = []
    assert split.run([lambda: 1, lambda: seen.append(_blas_threads()) or 2]) == [1, 2]
    assert all(n == 1 for n in seen[0])  # one BLAS thread while the pieces run
    assert _blas_threads() == before
    with pytest.raises(RuntimeError, match="a piece failed"):
        split.run([lambda: 1, fails])
    assert _blas_threads() == before


def test_free_workspace_frees_the_pieces_work_arrays(generated_module, derivations):
    module = generated_module("lstm")
    D = derivations["lstm"]
    params, x, targets, _ = random_problem(D, tiny_sizes(D), T=5, B=4)
    module.loss_and_grads(params, x, targets, threads=2)
    slots = list(module._MODEL.cache._slots)
    assert any(slot.last is not None for slot in slots)
    module.free_workspace()
    assert all(slot.last is None for slot in slots)


def test_combine_weights_each_piece_by_its_loss_weight():
    loss, grads = split.combine([1.0, 3.0], [(2.0, {"W": np.array([4.0])}),
                                             (6.0, {"W": np.array([8.0])})])
    assert loss == pytest.approx(0.25 * 2 + 0.75 * 6)
    assert grads["W"][0] == pytest.approx(0.25 * 4 + 0.75 * 8)


def test_every_builtin_declares_its_loop_weights():
    """The rule reads the weights of the products inside a time loop; every built-in
    with a recurrence through a product has some (a regression guard for the layout)."""
    import importlib

    for name in BUILTIN:
        module = importlib.import_module(f"bpttgen.generated.{name}")
        assert module._MODEL._loop_weights, name
