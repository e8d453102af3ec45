"""RTRL (codegen/rtrl.py, codegen/online.py): forward-mode sensitivities from the same
Derivation give the BPTT gradient at fixed weights, carry over calls, refuse what
would not fit in memory, and train online.

Tiny sizes and the committed generated modules; every built-in model is checked.
"""

import numpy as np
import pytest

from bpttgen.codegen.runtime import online
from bpttgen.codegen.app import tasks
from bpttgen.derive import derive
from bpttgen.derive.models import BUILTIN
from helpers import (CASES, COSTLY, max_relative_error, random_problem, skip_refused,
                     tiny_sizes)


def _problem(generated_module, name, T=5, B=2, seed=1):
    D = derive(CASES[name]())
    params, x, targets, state0 = random_problem(D, tiny_sizes(D, 3), T=T, B=B, seed=seed)
    return generated_module(name), D, params, x, targets, state0


@pytest.mark.parametrize("name", sorted(set(BUILTIN) - COSTLY))  # (helpers.COSTLY)
def test_rtrl_equals_bptt(generated_module, name):
    """Every term of the loss: initial states, a mask with a zero, L2 (float64)."""
    skip_refused(generated_module(name), "rtrl")
    module, D, params, x, targets, state0 = _problem(generated_module, name)
    mask = np.array([[1, 1], [0, 1], [1, 0], [1, 1], [0.5, 1]])
    kw = dict(state0=state0, mask=mask, l2=0.05)
    loss, bptt = module.loss_and_grads(params, x, targets, **kw)
    loss_r, rtrl = module.loss_and_grads(params, x, targets, algorithm="rtrl", **kw)
    assert loss_r == pytest.approx(loss, rel=1e-12)
    assert set(rtrl) == set(params)
    for k in params:
        assert rtrl[k].shape == params[k].shape and rtrl[k].dtype == np.float64
        assert max_relative_error(rtrl[k], bptt[k]) < 1e-9, k


def test_rtrl_loss_at_the_last_step_only(generated_module):
    """The adding problem's schedule: only the last step's loss, reaching back T steps."""
    module, D, params, x, targets, state0 = _problem(generated_module, "lstm", T=7)
    mask = np.zeros(x.shape[:2])
    mask[-1] = 1
    _, bptt = module.loss_and_grads(params, x, targets, mask=mask)
    _, rtrl = module.loss_and_grads(params, x, targets, mask=mask, algorithm="rtrl")
    for k in params:
        assert max_relative_error(rtrl[k], bptt[k]) < 1e-9, k


def test_directions_cover_the_recurrent_parameters(generated_module):
    """Directions for what reaches a state; the readout's gradient comes from the
    post-phase backward."""
    module = generated_module("deep")
    assert module.RTRL_PARAMS == ("W_1", "b_1", "W_r", "V", "b_r")
    NP, directions = module.rtrl_directions({"I": 2, "F": 3, "H": 4, "O": 5})
    assert NP == 3 * 2 + 3 + 4 * 3 + 4 * 4 + 4
    assert [(p, first, count) for p, first, count, _ in directions] == [
        ("W_1", 0, 6), ("b_1", 6, 3), ("W_r", 9, 12), ("V", 21, 16), ("b_r", 37, 4)]


def test_sensitivities_are_the_jacobian_of_the_final_state(generated_module):
    """dS_T/dtheta returned by rtrl() against central differences of forward()."""
    module, D, params, x, targets, state0 = _problem(generated_module, "gru", T=4)
    _, _, final, sens = module.rtrl(params, x, targets, state0=state0)
    NP, directions = module.rtrl_directions({"I": 3, "H": 4, "O": 3})
    eps = 1e-6
    for name, first, count, shape in directions:
        for i in range(count):
            idx = np.unravel_index(i, shape)
            value = params[name][idx]
            fd = {}
            for sign in (1, -1):
                params[name][idx] = value + sign * eps
                fd[sign] = module.forward(params, x, state0=state0)[1]["h"]
            params[name][idx] = value
            expected = (fd[1] - fd[-1]) / (2 * eps)  # (B, H)
            got = sens["h"][:, :, first + i].T
            assert max_relative_error(got, expected) < 1e-6, (name, idx)
    np.testing.assert_allclose(final["h"], module.forward(params, x, state0=state0)[1]["h"])


def test_carried_sensitivities_continue_the_sequence(generated_module):
    """Two calls, the second starting from the first's states and sensitivities:
    their gradients (weighted by their loss terms) sum to the one-call gradient."""
    module, D, params, x, targets, state0 = _problem(generated_module, "lstm2", T=6, B=3)
    _, whole = module.loss_and_grads(params, x, targets, state0=state0, algorithm="rtrl")
    l1, g1, s1, sens1 = module.rtrl(params, x[:2], targets[:2], state0=state0)
    l2, g2, _, _ = module.rtrl(params, x[2:], targets[2:], state0=s1, sensitivities=sens1)
    for k in params:
        joined = (2 * g1[k] + 4 * g2[k]) / 6
        assert max_relative_error(joined, whole[k]) < 1e-9, k


def test_rtrl_keeps_inputs_and_accepts_float32(generated_module):
    module, D, params, x, targets, state0 = _problem(generated_module, "elman")
    _, _, s1, sens = module.rtrl(params, x[:2], targets[:2], state0=state0)
    before = {k: v.copy() for k, v in sens.items()}
    module.rtrl(params, x[2:], targets[2:], state0=s1, sensitivities=sens)
    for k in sens:
        np.testing.assert_array_equal(sens[k], before[k])
    f32 = {k: v.astype(np.float32) for k, v in params.items()}
    _, g32 = module.loss_and_grads(f32, x.astype(np.float32), targets, algorithm="rtrl")
    _, g64 = module.loss_and_grads(params, x, targets)
    for k in params:
        assert g32[k].dtype == np.float32
        assert max_relative_error(g32[k], g64[k]) < 2e-3, k


# -- memory and options ---------------------------------------------------------------
def _big_elman(generated_module, H=512, B=64):
    module = generated_module("elman")
    params = module.init_params({"I": 8, "H": H, "O": 8}, dtype=np.float64)
    x = np.zeros((3, B, 8))
    return module, params, x, np.zeros((3, B), np.int64)


def test_memory_refused_before_anything_runs(generated_module, monkeypatch):
    module, params, x, targets = _big_elman(generated_module)
    NP = 512 * 512 + 512 * 8 + 512
    need = 8 * (4 * 512 * 64 * NP + NP)  # 4H tangent rows x B x NP float64: 260 GiB
    with pytest.raises(ValueError) as err:
        module.loss_and_grads(params, x, targets, algorithm="rtrl")
    message = str(err.value)
    assert f"{need / 1024 ** 3:.2f} GiB" in message and "limit of 2.00 GiB" in message
    assert f"NP={NP}" in message and "B=64" in message and "memory_limit" in message
    # The limit is a keyword and a module setting.
    with pytest.raises(ValueError, match=r"limit of 1.00 MiB"):
        module.loss_and_grads(params, x[:, :1], targets[:, :1], algorithm="rtrl",
                              memory_limit=2 ** 20)
    monkeypatch.setattr(online, "RTRL_MEMORY_LIMIT", 2 ** 30)
    with pytest.raises(ValueError, match=r"limit of 1.00 GiB"):
        module.rtrl(params, x[:, :1], targets[:, :1])


@pytest.mark.parametrize("kw, match", [
    (dict(algorithm="bptt", memory_limit=10), "more than memory_limit=10 bytes"),
    (dict(algorithm="bptt", segment=2), "segment apply to algorithm='checkpoint'"),
    (dict(algorithm="rtrl", k1=2, k2=2), "k1/k2 apply to algorithm='tbptt', not 'rtrl'"),
    (dict(algorithm="rtrl", c=0.1), "apply to algorithm='artbp', not 'rtrl'"),
    (dict(algorithm="rtrl", memory_limit=-1), "memory_limit must be a positive number"),
    (dict(algorithm="rtrl", mask=np.zeros((5, 2))), "mask selects no loss term"),
])
def test_rtrl_refuses_bad_options(generated_module, kw, match):
    module, D, params, x, targets, state0 = _problem(generated_module, "elman")
    with pytest.raises(ValueError, match=match):
        module.loss_and_grads(params, x, targets, **kw)


def test_bad_sensitivities_are_named(generated_module):
    module, D, params, x, targets, state0 = _problem(generated_module, "elman")
    with pytest.raises(ValueError, match=r"sensitivities\['h'\] must be a float64 array "
                                         r"of shape \(size, B, NP\) = \(4, 2, 32\)"):
        module.rtrl(params, x, targets, sensitivities={"h": np.zeros((4, 2, 3))})


# -- online -----------------------------------------------------------------------------
def test_online_rtrl_updates_every_k_steps_and_learns(generated_module):
    module = generated_module("elman")
    task = tasks.parity(8, 64, seed=0)
    sizes = {"I": task.sizes["I"], "H": 8, "O": task.sizes["O"]}
    tr = module.Trainer(sizes, algorithm="rtrl", every=3, optimizer="adam", lr=0.03,
                        dtype=np.float64)
    tr.step(task.x[:, :4], task.targets[:, :4])
    assert tr.steps == 3  # after steps 3, 6 and 8
    every_step = module.Trainer(sizes, algorithm="rtrl", optimizer="adam", lr=0.02)
    history = every_step.fit(task.x, task.targets, epochs=6, batch_size=16, progress=False)
    assert every_step.steps == 6 * 4 * 8
    assert history["loss"][-1] < 0.75 * history["loss"][0], history["loss"]


def test_online_rtrl_with_one_update_is_bptt(generated_module):
    """every = T: one update per minibatch, the exact gradient."""
    module = generated_module("gru")
    task = tasks.parity(5, 4, seed=2)
    sizes = {"I": task.sizes["I"], "H": 3, "O": task.sizes["O"]}
    kw = dict(optimizer="sgd", lr=0.5, seed=1, dtype=np.float64)
    a = module.Trainer(sizes, algorithm="rtrl", every=5, **kw)
    b = module.Trainer(sizes, **kw)
    assert a.step(task.x, task.targets) == pytest.approx(b.step(task.x, task.targets))
    for k in a.params:
        np.testing.assert_allclose(a.params[k], b.params[k], rtol=1e-10)


def test_trainer_options():
    import bpttgen.generated.elman as module

    with pytest.raises(ValueError, match="every must be a positive integer"):
        module.Trainer({"I": 1, "H": 2, "O": 2}, algorithm="rtrl", every=0)
    with pytest.raises(ValueError, match="every applies to algorithm='rtrl'"):
        module.Trainer({"I": 1, "H": 2, "O": 2}, every=2)
