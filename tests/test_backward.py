"""The backward step as data (derive/backward.py): the sums hold for any cell.

Every reader (LaTeX, the layout, the RTRL printer, the reference) trusts these sums,
so they are checked on the built-ins and on cells the fuzzer draws: each local
derivative enters exactly one adjoint or gradient, each product its transpose and
outer terms, the sweep computes a vector after everything it reads, one error term
starts the sweep, and each state carries exactly when its previous value is read.
Their values are checked elsewhere: the reference built from them against finite
differences (tests/test_reference.py), every generated module by the fuzzer.
"""

import pytest

from bpttgen.derive.derivation import derive
from bpttgen.derive.models import BUILTIN, build

from helpers import fuzz_derivations

FUZZ_SEED, FUZZ_CELLS = 7, 40
DERIVATIONS = [(name, derive(build(name))) for name in BUILTIN] + \
    fuzz_derivations(FUZZ_SEED, FUZZ_CELLS)


def test_enough_fuzz_cells_derive():
    assert len(DERIVATIONS) - len(BUILTIN) >= FUZZ_CELLS // 3


@pytest.mark.parametrize("name,d", DERIVATIONS, ids=[n for n, _ in DERIVATIONS])
def test_sums_are_complete_and_ordered(name, d):
    bw = d.backward
    params = {p.name: p for p in d.params}
    prevs = {s.prev: s for s in d.states}
    # Each elementwise node's derivative along each of its arguments and parameters
    # is one term; each product gives W^T into its source and an outer product into W.
    # A term into a reduction (one number per row) sums over the units, no other does.
    reductions = d.reductions()
    for n in d.nodes:
        leaving = [t for t in bw.terms if t.via == n.name]
        if n.kind != "linear":
            assert sorted(t.target for t in leaving) == sorted(n.args + n.params)
            assert {t.rule for t in leaving} <= {"local"}
            assert all(t.reduce == (t.target in reductions) for t in leaving)
        else:
            assert sorted((t.rule, t.target) for t in leaving) == \
                [("outer", n.weight), ("transpose", n.source)]
    # The sweep computes every vector after all the vectors whose adjoint it reads.
    position = {name: i for i, name in enumerate(bw.sweep)}
    assert set(position) == {n.name for n in d.nodes} | \
        {t.target for t in bw.terms if t.target in prevs}
    for target in bw.sweep:
        for t in bw.adjoint(target):
            if t.rule in ("local", "transpose"):
                assert position[t.via] < position[target], (t, bw.sweep)
    # One error term, into the readout, first in its sum.
    errors = [t for t in bw.terms if t.rule == "error"]
    assert [t.target for t in errors] == [d.loss.node]
    assert bw.adjoint(d.loss.node)[0].rule == "error"
    # A state carries exactly when its previous value is read, as the last term.
    for s in d.states:
        carries = [t for t in bw.adjoint(s.name) if t.rule == "carry"]
        assert len(carries) == (1 if bw.consumers(s.prev) else 0)
        if carries:
            assert bw.adjoint(s.name)[-1] == carries[0] and carries[0].via == s.prev
    # Every parameter has a gradient, of its own kind.
    for p in params.values():
        rules = {t.rule for t in bw.gradient(p.name)}
        assert rules == ({"outer"} if p.kind == "matrix" else {"local"}), p.name


@pytest.mark.parametrize("name,d", DERIVATIONS, ids=[n for n, _ in DERIVATIONS])
def test_tangents_read_only_earlier_tangents(name, d):
    bw = d.backward
    vectors = list(bw.tangent_vectors)
    vector_params = {p.name for p in d.params if p.kind == "vector"}
    for i, name in enumerate(vectors):
        terms = bw.tangent(name)
        if name in {s.prev for s in d.states}:
            assert not terms  # S_{t-1}: the previous step's, not a sum
            continue
        assert terms, name
        for t in terms:
            if t.rule in ("local", "product"):
                assert t.via in vectors[:i], (name, t)
            elif t.rule == "direction":
                assert t.via in vector_params and t.via in bw.directions
            else:
                assert t.rule == "weight" and t.weight in bw.directions
