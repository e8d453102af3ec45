"""A model defined only in tests/ goes through the whole pipeline: generated into a
temporary folder, imported, gradient-checked and trained, with no change to
derive/, codegen/ or templates/."""

import os

import numpy as np
import pytest

from bpttgen.codegen.generate import generate, import_path
from bpttgen.derive import derive
from bpttgen.derive.loader import load_model
from helpers import finite_difference, max_relative_error, random_problem

CELL = os.path.join(os.path.dirname(__file__), "data", "latex_cell.py")


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    model = load_model(CELL)
    path, = generate(model, str(tmp_path_factory.mktemp("user")), "pytest")
    return import_path(path, "bpttgen_test_user_leaky"), derive(model)


def test_user_cell_gradients(user_module):
    module, D = user_module
    params, x, targets, state0 = random_problem(D, {"I": 3, "H": 4, "O": 2}, T=5, B=2)
    kw = dict(state0=state0, l2=0.01)
    loss, grads = module.loss_and_grads(params, x, targets, **kw)
    fd = finite_difference(lambda p: module.loss_and_grads(p, x, targets, **kw)[0], params)
    for name in params:
        assert max_relative_error(grads[name], fd[name]) < 1e-6, name
    for algorithm in ("naive", "epochwise"):
        _, other = module.loss_and_grads(params, x, targets, algorithm=algorithm, **kw)
        for name in params:
            assert max_relative_error(other[name], grads[name]) < 1e-10, name


def test_user_cell_trains(user_module):
    """The last-step BCE target is whether the first input's first feature was
    positive: a dependency over the whole sequence."""
    module, _ = user_module
    rng = np.random.default_rng(0)
    T, N = 6, 64
    x = rng.normal(size=(T, N, 3))
    targets = np.zeros((T, N, 2))
    targets[-1, :, 0] = x[0, :, 0] > 0
    targets[-1, :, 1] = x[0, :, 1] > 0
    trainer = module.Trainer({"I": 3, "H": 8, "O": 2}, optimizer="adam", lr=0.05,
                             dtype=np.float64, seed=0)
    history = trainer.fit(x, targets, epochs=60, batch_size=32, progress=False)
    # Chance level is 2 ln 2 = 1.39 (two BCE units); the cell gets well below it.
    assert history["loss"][-1] < 0.6 * history["loss"][0]
