"""Tier 2 for the NumPy reference: its gradients against central finite differences."""

import numpy as np
import pytest

from bpttgen.derive import derive
from bpttgen.derive import reference
from helpers import (COSTLY, CASES, finite_difference, max_relative_error, random_problem,
                     tiny_sizes)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("variant", ["plain", "l2+mask"])
def test_reference_matches_finite_differences(case, variant):
    if case in COSTLY and variant != "plain":
        pytest.skip("helpers.COSTLY: the second variant runs on the cheaper built-ins")
    D = derive(CASES[case]())
    params, x, targets, state0 = random_problem(D, tiny_sizes(D, 2), T=3, B=2)
    kw = {"state0": state0}
    if variant == "l2+mask":
        kw.update(l2=0.1, mask=np.array([[1, 0], [1, 1], [0, 1]], dtype=float))
    loss, grads = reference.loss_and_grads(D, params, x, targets, **kw)
    fd = finite_difference(lambda p: reference.loss_and_grads(D, p, x, targets, **kw)[0],
                           params)
    for name in params:
        assert max_relative_error(grads[name], fd[name]) < 1e-6, name
