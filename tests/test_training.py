"""The Trainer: nets learn, the optimizers follow their update rules, online
TBPTT and epochwise BPTT do what seeds 003 and 001 say, and save/load round-trips.

Tiny sizes and the committed generated modules (compiled once, cached by Numba).
"""

import importlib

import numpy as np
import pytest

from bpttgen.codegen.app import tasks


@pytest.fixture(scope="module")
def elman():
    return importlib.import_module("bpttgen.generated.elman")


@pytest.fixture(scope="module")
def lstm():
    return importlib.import_module("bpttgen.generated.lstm")


def sizes_for(task, hidden):
    return {"I": task.sizes["I"], "H": hidden, "O": task.sizes["O"]}


# -- nets learn ----------------------------------------------------------------------
def test_elman_learns_running_parity(elman):
    """Loss falls by a factor of 4 or more (from ln 2 = 0.69; typically ~0.01)."""
    task = tasks.parity(8, 256, seed=0)
    tr = elman.Trainer(sizes_for(task, 16), optimizer="adam", lr=0.03, seed=0)
    history = tr.fit(task.x, task.targets, epochs=15, batch_size=32, progress=False)
    assert history["loss"][0] > 0.6
    assert history["loss"][-1] < history["loss"][0] / 4, history["loss"]


def test_lstm_learns_the_adding_problem(lstm):
    """Loss at the last step falls by a factor of 3 or more (typically ~7), and
    held-out sequences beat the best memoryless guess by a factor of 2."""
    data = tasks.adding(10, 640, classes=3, seed=0)
    train, test = data.split(128)
    tr = lstm.Trainer(sizes_for(data, 16), optimizer="adam", lr=0.03, seed=0)
    history = tr.fit(train.x, train.targets, epochs=15, batch_size=32, mask=train.mask,
                     progress=False)
    assert history["loss"][-1] < history["loss"][0] / 3, history["loss"]
    test_loss, _ = tr.loss_and_grads(test.x, test.targets, mask=test.mask)
    assert test_loss < data.baseline / 2, (test_loss, data.baseline)


# -- the optimizers -------------------------------------------------------------------
def _batch(seed=0, T=6, B=8):
    task = tasks.parity(T, B, seed=seed)
    return task.x, task.targets


def _fixed_grads(tr, value):
    return {k: np.full_like(v, value) for k, v in tr.params.items()}


def test_sgd_momentum_adam_update_rules(elman):
    sizes = {"I": 1, "H": 3, "O": 2}
    for optimizer in ("sgd", "momentum", "adam"):
        tr = elman.Trainer(sizes, optimizer=optimizer, lr=0.1, momentum=0.5, seed=0)
        p0 = {k: v.astype(np.float64) for k, v in tr.params.items()}
        g = _fixed_grads(tr, 2.0)
        tr.apply(g)
        tr.apply(g)
        for k in p0:
            moved = p0[k] - tr.params[k]
            # sgd: 2 * lr * g; momentum: lr * (g + (0.5 g + g)); adam: lr * sign(g) twice
            expected = {"sgd": 0.4, "momentum": 0.5, "adam": 0.2}[optimizer]
            np.testing.assert_allclose(moved, expected, rtol=1e-5, err_msg=optimizer)
    assert tr.steps == 2


@pytest.mark.parametrize("optimizer,lr", [("sgd", 1.0), ("momentum", 0.2), ("adam", 0.05)])
def test_each_optimizer_reduces_the_loss(elman, optimizer, lr):
    x, y = _batch()
    tr = elman.Trainer({"I": 1, "H": 8, "O": 2}, optimizer=optimizer, lr=lr, seed=1)
    before = tr.loss_and_grads(x, y)[0]
    for _ in range(60):
        tr.step(x, y)
    assert tr.loss_and_grads(x, y)[0] < 0.75 * before  # typically 0.25 .. 0.5


def test_clip_scales_the_gradient_norm(elman):
    tr = elman.Trainer({"I": 1, "H": 3, "O": 2}, optimizer="sgd", lr=0.1, clip=0.5)
    p0 = {k: v.astype(np.float64) for k, v in tr.params.items()}
    g = _fixed_grads(tr, 1.0)  # norm sqrt(#params) > 0.5
    tr.apply(g)
    step = np.sqrt(sum(np.sum((p0[k] - tr.params[k]) ** 2) for k in p0))
    assert step == pytest.approx(0.1 * 0.5, rel=1e-5)
    # Below the threshold nothing is scaled.
    tr2 = elman.Trainer({"I": 1, "H": 3, "O": 2}, optimizer="sgd", lr=0.1, clip=1e6)
    p0 = {k: v.astype(np.float64) for k, v in tr2.params.items()}
    tr2.apply(g)
    for k in p0:
        np.testing.assert_allclose(p0[k] - tr2.params[k], 0.1, rtol=1e-5)


# -- online TBPTT and epochwise BPTT --------------------------------------------------
def test_online_tbptt_with_k1_equal_T_is_one_bptt_step(elman):
    x, y = _batch(T=6)
    kw = dict(optimizer="adam", lr=0.05, seed=3, dtype=np.float64)
    full = elman.Trainer({"I": 1, "H": 4, "O": 2}, **kw)
    online = elman.Trainer({"I": 1, "H": 4, "O": 2}, algorithm="tbptt", k1=6, k2=6, **kw)
    assert full.step(x, y) == pytest.approx(online.step(x, y), rel=1e-12)
    assert online.steps == 1
    for k in full.params:
        np.testing.assert_allclose(online.params[k], full.params[k], rtol=1e-12)


def test_online_tbptt_updates_every_k1_steps(elman):
    x, y = _batch(T=7)
    tr = elman.Trainer({"I": 1, "H": 4, "O": 2}, algorithm="tbptt", k1=2, k2=3,
                       optimizer="adam", lr=0.05, dtype=np.float64)
    tr.step(x, y)
    assert tr.steps == 4  # updates after steps 2, 4, 6 and 7
    # On two steps, one window: the update of the plain gradient.
    fresh = elman.Trainer({"I": 1, "H": 4, "O": 2}, dtype=np.float64)
    _, g = fresh.loss_and_grads(x[:2].astype(np.float64), y[:2])
    manual = elman.Trainer({"I": 1, "H": 4, "O": 2}, optimizer="adam", lr=0.05,
                           dtype=np.float64)
    manual.apply(g)
    partial = elman.Trainer({"I": 1, "H": 4, "O": 2}, algorithm="tbptt", k1=2, k2=3,
                            optimizer="adam", lr=0.05, dtype=np.float64)
    partial.step(x[:2], y[:2])
    for k in g:
        np.testing.assert_allclose(partial.params[k], manual.params[k], rtol=1e-12)


def test_online_tbptt_skips_windows_without_loss(elman):
    """A loss only at the last step (the adding problem): the windows before it
    carry the state and make no update."""
    task = tasks.adding(8, 6, classes=2, seed=0)
    tr = elman.Trainer(sizes_for(task, 4), algorithm="tbptt", k1=3, k2=3, lr=0.1)
    loss = tr.step(task.x, task.targets, task.mask)
    assert tr.steps == 1 and np.isfinite(loss)


def test_epochwise_makes_one_update_per_epoch(elman):
    """The update is the mean of the minibatch gradients of the whole epoch (seed
    001), taken with the weights of the epoch's start."""
    task = tasks.parity(5, 12, seed=4)
    kw = dict(optimizer="sgd", lr=0.3, seed=2, dtype=np.float64)
    tr = elman.Trainer(sizes_for(task, 4), algorithm="epochwise", **kw)
    start = {k: v.copy() for k, v in tr.params.items()}
    tr.fit(task.x, task.targets, epochs=1, batch_size=4, progress=False)
    assert tr.steps == 1
    # Three minibatches of equal weight: the mean of their mean gradients is the
    # gradient over all 12 sequences at once.
    ref = elman.Trainer(sizes_for(task, 4), **kw)
    _, grads = ref.loss_and_grads(task.x.astype(np.float64), task.targets)
    for k in start:
        np.testing.assert_allclose(tr.params[k], start[k] - 0.3 * grads[k], rtol=1e-10,
                                   atol=1e-12)
    tr.fit(task.x, task.targets, epochs=4, batch_size=4, progress=False)
    assert tr.steps == 5


# -- persistence ----------------------------------------------------------------------
def test_save_load_round_trip(lstm, tmp_path):
    task = tasks.parity(6, 16, seed=0)
    tr = lstm.Trainer(sizes_for(task, 5), optimizer="adam", lr=0.02, seed=7)
    tr.fit(task.x, task.targets, epochs=2, batch_size=8, progress=False)
    tr.save(tmp_path / "p.npz", meta={"note": "round trip"})
    back = lstm.Trainer(sizes_for(task, 5), optimizer="adam", lr=0.02).load(tmp_path / "p.npz")
    assert back.steps == tr.steps == 4
    assert back.history == tr.history and back.meta == {"note": "round trip"}
    for k in tr.params:
        np.testing.assert_array_equal(back.params[k], tr.params[k])
        assert back.params[k].dtype == np.float32
        for a, b in zip(back._slots[k], tr._slots[k]):  # Adam's moments
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(back.predict(task.x), tr.predict(task.x))
    # The next step of both is the same: the optimizer state came back too.
    x, y = task.x[:, :8], task.targets[:, :8]
    tr.step(x, y)
    back.step(x, y)
    for k in tr.params:
        np.testing.assert_array_equal(back.params[k], tr.params[k])
    # Another optimizer takes the parameters but not the slots.
    sgd = lstm.Trainer(sizes_for(task, 5), optimizer="sgd").load(tmp_path / "p.npz")
    assert sgd._slots == {}


# -- a held-out loss --------------------------------------------------------------------
def test_fit_records_the_held_out_loss_of_each_epoch(elman):
    """validation=(x, targets, mask): after each epoch its loss, as the module's loss()
    gives it for the parameters of that moment (L2 included), in history and in the
    epoch's callback; and it survives save and load."""
    task, held = tasks.parity(6, 16, seed=0), tasks.parity(6, 5, seed=1)
    mask = np.random.default_rng(2).random(held.x.shape[:2])
    tr = elman.Trainer(sizes_for(task, 5), optimizer="adam", lr=0.05, l2=0.01, seed=3,
                       dtype=np.float64)
    seen = []

    def callback(trainer, info):
        if info["event"] == "epoch":
            want = elman.loss(trainer.params, held.x.astype(np.float64), held.targets,
                              mask=mask, l2=0.01)
            seen.append((info["val_loss"], want))

    history = tr.fit(task.x, task.targets, epochs=3, batch_size=8, progress=False,
                     validation=(held.x, held.targets, mask), callback=callback)
    assert len(history["val_loss"]) == 3 == len(history["loss"])
    assert [v for v, _ in seen] == history["val_loss"]
    assert all(v == want for v, want in seen)
    assert history["val_loss"][0] != history["val_loss"][-1]  # the parameters moved
    assert tr.evaluate(held.x, held.targets, mask) == seen[-1][1]
    tr.fit(task.x, task.targets, epochs=4, batch_size=8, progress=False, resume=True,
           validation=(held.x, held.targets, mask))
    assert len(tr.history["val_loss"]) == 4  # one more epoch, one more entry
    tr.fit(task.x, task.targets, epochs=1, batch_size=8, progress=False)
    assert "val_loss" not in tr.history  # a new fit without validation


def test_bad_validation_data_is_refused_before_training(elman):
    task = tasks.parity(6, 16, seed=0)
    tr = elman.Trainer(sizes_for(task, 5), seed=3)
    with pytest.raises(TypeError, match=r"validation must be \(x, targets\)"):
        tr.fit(task.x, task.targets, progress=False, validation=task.x)
    with pytest.raises(ValueError, match="targets must start with x's"):
        tr.fit(task.x, task.targets, progress=False,
               validation=(task.x, task.targets[:3]))
    assert tr.steps == 0
