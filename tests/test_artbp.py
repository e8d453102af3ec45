"""ARTBP (codegen/online.py and the carry factor of the backward kernel): truncation at
random points with the adjoint reweighted by 1/(1 - c_t), an unbiased estimate of the
BPTT gradient, where plain truncation with the same mean length is biased.

The statistical test uses fixed seeds, so it is deterministic; its bound comes from
the sample variance of the estimates (a z-score per gradient element).
"""

import numpy as np
import pytest

from bpttgen.codegen.runtime import online
from bpttgen.codegen.app import tasks
from bpttgen.derive import derive, reference
from bpttgen.derive.models import BUILTIN
from helpers import CASES, max_relative_error, random_problem, skip_refused, tiny_sizes


def _problem(generated_module, name, T=6, B=2, seed=1):
    D = derive(CASES[name]())
    params, x, targets, state0 = random_problem(D, tiny_sizes(D, 3), T=T, B=B, seed=seed)
    return generated_module(name), D, params, x, targets, state0


# -- exact cases --------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_carry_factors_match_the_reference(generated_module, name):
    """Given cuts and c_t, every contribution to a previous state's adjoint (partials
    and products) is scaled: the kernel against the NumPy reference with the same
    factors, on every built-in model."""
    skip_refused(generated_module(name), "artbp")
    module, D, params, x, targets, state0 = _problem(generated_module, name)
    c = np.array([0.1, 0.3, 0.5, 0.2, 0.4, 0.25])
    cut = np.array([False, False, True, False, False, False])
    kw = dict(state0=state0, mask=np.ones(x.shape[:2]), l2=0.01)
    loss, grads = module.loss_and_grads(params, x, targets, algorithm="artbp", c=c,
                                        truncate=cut, **kw)
    factors = online.artbp_carry(6, c, truncate=cut)
    ref_loss, ref = reference.loss_and_grads(D, params, x, targets, carry=factors, **kw)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    for k in ref:
        assert max_relative_error(grads[k], ref[k]) < 1e-10, k


def test_no_cut_and_every_cut(generated_module):
    """c = 0 never cuts: BPTT. Every step cut: TBPTT(1, 1). Cuts every k steps with
    no reweighting (c = 0): TBPTT(k, k)."""
    module, D, params, x, targets, state0 = _problem(generated_module, "lstm")
    T = x.shape[0]
    _, bptt = module.loss_and_grads(params, x, targets, state0=state0)
    _, never = module.loss_and_grads(params, x, targets, state0=state0, algorithm="artbp",
                                     c=0.0, seed=5)
    _, always = module.loss_and_grads(params, x, targets, state0=state0, algorithm="artbp",
                                      c=1.0, seed=5)
    _, tb11 = module.loss_and_grads(params, x, targets, state0=state0, algorithm="tbptt",
                                    k1=1, k2=1)
    every3 = np.arange(T) % 3 == 0
    _, cut3 = module.loss_and_grads(params, x, targets, state0=state0, algorithm="artbp",
                                    c=0.0, truncate=every3)
    _, tb33 = module.loss_and_grads(params, x, targets, state0=state0, algorithm="tbptt",
                                    k1=3, k2=3)
    for k in params:
        assert max_relative_error(never[k], bptt[k]) < 1e-12, k
        assert max_relative_error(always[k], tb11[k]) < 1e-12, k
        assert max_relative_error(cut3[k], tb33[k]) < 1e-12, k


def test_seeds_are_reproducible(generated_module):
    module, D, params, x, targets, state0 = _problem(generated_module, "gru", T=12)
    run = lambda seed: module.loss_and_grads(params, x, targets, algorithm="artbp",  # noqa: E731
                                             c=0.3, seed=seed)[1]["U_r"]
    np.testing.assert_array_equal(run(7), run(7))
    np.testing.assert_array_equal(run(np.random.default_rng(7)), run(7))
    assert not np.array_equal(run(7), run(8))


@pytest.mark.parametrize("kw, error, match", [
    (dict(algorithm="artbp"), ValueError, "needs c, the truncation probability"),
    (dict(algorithm="artbp", c=1.5), ValueError, r"must lie in \[0, 1\]"),
    (dict(algorithm="artbp", c=np.full(3, 0.1)), ValueError, r"shape \(T,\) = \(6,\)"),
    (dict(algorithm="artbp", c="0.1"), TypeError, "c must be a number or an array"),
    (dict(algorithm="artbp", c=0.1, seed="x"), TypeError, "seed must be an integer"),
    (dict(algorithm="artbp", c=0.1, truncate=np.zeros(6)), ValueError,
     "truncate must be a bool array"),
    (dict(algorithm="artbp", c=1.0, truncate=np.zeros(6, bool)), ValueError,
     "where c = 1"),
    (dict(algorithm="bptt", c=0.1, seed=0), ValueError,
     "c/seed apply to algorithm='artbp', not 'bptt'"),
    (dict(algorithm="artbp", c=0.1, k1=2, k2=2), ValueError, "k1/k2 apply to"),
    (dict(algorithm="magic"), ValueError, "unknown algorithm 'magic'; choose one of"),
])
def test_bad_options_are_named(generated_module, kw, error, match):
    module, D, params, x, targets, state0 = _problem(generated_module, "elman")
    with pytest.raises(error, match=match):
        module.loss_and_grads(params, x, targets, **kw)


# -- unbiased, where truncation is not ---------------------------------------------------
SAMPLES = 2000
Z_BOUND = 5.0  # |mean - full| / standard error, for every gradient element


def _long_dependency(module):
    """An Elman net with a loss at the last step only and a recurrence that keeps what
    it saw (orthogonal W_hh, small inputs: tanh near its linear range), so the
    gradient reaches back all T steps."""
    rng = np.random.default_rng(0)
    I, H, O, T, B = 2, 5, 3, 30, 4
    params = module.init_params({"I": I, "H": H, "O": O}, seed=0, dtype=np.float64)
    params["W_hh"], _ = np.linalg.qr(rng.normal(size=(H, H)))
    params["W_xh"] = rng.normal(0, 0.3, (H, I))
    x = rng.normal(0, 1, (T, B, I))
    targets = rng.integers(0, O, (T, B))
    mask = np.zeros((T, B))
    mask[-1] = 1
    return params, x, targets, mask


#: The parameters on the recurrent path, where truncation changes the gradient (the
#: readout's gradient is exact under any truncation: checked separately).
RECURRENT = ("W_xh", "W_hh", "b_h")


def _moments(samples):
    samples = np.array(samples)
    mean = samples.mean(axis=0)
    var = samples.var(axis=0, ddof=1)
    return mean, var, np.sqrt(var / len(samples))


def test_artbp_is_unbiased_and_truncation_is_not(generated_module):
    module = generated_module("elman")
    params, x, targets, mask = _long_dependency(module)
    T = x.shape[0]
    c = 0.1
    k = int(round(1 / c))  # TBPTT(k, k): the same mean truncation length
    _, bptt = module.loss_and_grads(params, x, targets, mask=mask)

    def run(**kw):
        _, g = module.loss_and_grads(params, x, targets, mask=mask, algorithm="artbp", **kw)
        for name in ("W_hy", "b_y"):
            assert max_relative_error(g[name], bptt[name]) < 1e-12, name
        return np.concatenate([g[name].ravel() for name in RECURRENT])

    full = np.concatenate([bptt[name].ravel() for name in RECURRENT])
    norm = np.linalg.norm(full)
    rng = np.random.default_rng(2017)
    artbp, plain, shifted = [], [], []
    for _ in range(SAMPLES):
        cut = rng.random(T) < c
        artbp.append(run(c=c, truncate=cut))  # reweighted: 1/(1 - c) where not cut
        plain.append(run(c=0.0, truncate=cut))  # the same cuts, not reweighted
        phase = rng.integers(k)  # TBPTT(k, k) with windows at a random phase
        shifted.append(run(c=0.0, truncate=(np.arange(T) - phase) % k == 0))

    mean, var_artbp, se = _moments(artbp)
    z = np.abs(mean - full) / se
    assert z.max() < Z_BOUND, z.max()
    assert np.linalg.norm(mean - full) < 0.05 * norm  # the bound is tight enough to matter

    # Plain truncation: its bias is far outside what ARTBP's noise allows...
    _, tbptt = module.loss_and_grads(params, x, targets, mask=mask, algorithm="tbptt",
                                     k1=k, k2=k)
    tbptt = np.concatenate([tbptt[name].ravel() for name in RECURRENT])
    assert np.max(np.abs(tbptt - full) / se) > 3 * Z_BOUND
    assert np.linalg.norm(tbptt - full) > 0.1 * norm
    # ... and the random versions miss the gradient by many of their own standard errors.
    report = [f"ARTBP(c={c}): max z {z.max():.1f}, relative error of the mean "
              f"{np.linalg.norm(mean - full) / norm:.3f}, total variance {var_artbp.sum():.3g}"]
    for name, samples in (("random cuts, not reweighted", plain),
                          (f"TBPTT({k},{k}), random phase", shifted)):
        m, var, s = _moments(samples)
        assert np.max(np.abs(m - full) / s) > 4 * Z_BOUND, name
        assert np.linalg.norm(m - full) > 0.2 * norm, name
        report.append(f"{name}: relative bias {np.linalg.norm(m - full) / norm:.3f}, "
                      f"total variance {var.sum():.3g}")
    print("\n" + "\n".join(report))


# -- online --------------------------------------------------------------------------------
def test_online_artbp_with_no_cut_is_one_bptt_step(generated_module):
    module = generated_module("elman")
    task = tasks.parity(6, 4, seed=1)
    sizes = {"I": task.sizes["I"], "H": 4, "O": task.sizes["O"]}
    kw = dict(optimizer="adam", lr=0.05, seed=3, dtype=np.float64)
    a = module.Trainer(sizes, algorithm="artbp", c=0.0, **kw)
    b = module.Trainer(sizes, **kw)
    assert a.step(task.x, task.targets) == pytest.approx(b.step(task.x, task.targets))
    assert a.steps == 1
    for name in a.params:
        np.testing.assert_allclose(a.params[name], b.params[name], rtol=1e-12)


def test_online_artbp_updates_at_cuts_and_learns(generated_module):
    module = generated_module("elman")
    task = tasks.parity(8, 64, seed=0)
    sizes = {"I": task.sizes["I"], "H": 8, "O": task.sizes["O"]}
    tr = module.Trainer(sizes, algorithm="artbp", c=0.25, optimizer="adam", lr=0.03)
    history = tr.fit(task.x, task.targets, epochs=8, batch_size=16, progress=False)
    assert 8 * 4 < tr.steps < 8 * 4 * 8  # more than one update per minibatch, fewer than T
    assert history["loss"][-1] < 0.85 * history["loss"][0], history["loss"]
    # A loss at the last step only: only the last stretch updates.
    adding = tasks.adding(12, 8, classes=2, seed=0)
    tr = module.Trainer({"I": 2, "H": 4, "O": 2}, algorithm="artbp", c=0.3)
    assert np.isfinite(tr.step(adding.x, adding.targets, adding.mask)) and tr.steps == 1


def test_trainer_needs_c():
    import bpttgen.generated.elman as module

    with pytest.raises(ValueError, match="needs c"):
        module.Trainer({"I": 1, "H": 2, "O": 2}, algorithm="artbp")
    with pytest.raises(ValueError, match="c applies to algorithm='artbp'"):
        module.Trainer({"I": 1, "H": 2, "O": 2}, c=0.1)


def test_doctests():
    import doctest

    assert doctest.testmod(online).failed == 0
