"""The module cache (codegen/module_cache.py): a generated module that a command only
imports is written once per source, at a path of its own, so that Numba finds the
kernels it compiled there again on the next run."""

import contextlib
import os
import sys

import numpy as np

from bpttgen.codegen import module_cache
from bpttgen.codegen.generate import generate_cached, import_path
from bpttgen.derive.models import build


def test_one_source_one_path_written_once(tmp_path, monkeypatch):
    monkeypatch.setenv("BPTTGEN_CACHE_DIR", str(tmp_path))
    path = module_cache.module_path("m.py", "x = 1\n")
    assert path.startswith(str(tmp_path)) and open(path).read() == "x = 1\n"
    stamp = os.stat(path)
    assert module_cache.module_path("m.py", "x = 1\n") == path
    again = os.stat(path)  # not rewritten: Numba's cache is keyed by this stamp
    assert (again.st_ino, again.st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns)
    other = module_cache.module_path("m.py", "x = 2\n")
    assert os.path.dirname(other) != os.path.dirname(path)
    assert open(path).read() == "x = 1\n" and open(other).read() == "x = 2\n"


def test_the_least_recently_used_go_beyond_keep(tmp_path, monkeypatch):
    monkeypatch.setenv("BPTTGEN_CACHE_DIR", str(tmp_path))
    paths = [module_cache.module_path("m.py", f"x = {i}\n", keep=10) for i in range(3)]
    for age, p in zip((300, 200, 100), paths):  # the first is the oldest
        os.utime(os.path.dirname(p), (1e9 - age, 1e9 - age))
    module_cache.module_path("m.py", "x = 1\n", keep=2)  # used again: now the newest
    assert [os.path.exists(p) for p in paths] == [False, True, True]


def test_an_unwritable_cache_falls_back_to_a_temporary_folder(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("BPTTGEN_CACHE_DIR", str(blocker / "modules"))
    assert module_cache.module_path("m.py", "x = 1\n") is None
    with contextlib.ExitStack() as stack:
        path = generate_cached(build("elman"), "pytest", stack, check=False)
        assert os.path.isfile(path) and not path.startswith(str(blocker))
    assert not os.path.exists(path)  # the temporary folder went with the stack


def test_a_second_import_loads_the_compiled_kernels(tmp_path, monkeypatch):
    """What the cache is for: the same source imported again (a second bpttgen check
    or train) finds its kernels in Numba's cache instead of compiling them."""
    monkeypatch.setenv("BPTTGEN_CACHE_DIR", str(tmp_path))
    modules = []
    for run in range(2):
        with contextlib.ExitStack() as stack:
            path = generate_cached(build("elman"), "pytest", stack, check=False)
        name = f"bpttgen_test_cached_elman_{run}"
        m = import_path(path, name)
        try:
            params = m.init_params(dict(I=2, H=3, O=2), dtype=np.float64)
            m.loss_and_grads(params, np.ones((2, 1, 2)), np.zeros((2, 1), np.int64))
        finally:
            sys.modules.pop(name, None)
        modules.append(m)
    first, second = (m._run.stats for m in modules)
    assert sum(first.cache_misses.values()) == 1 and not first.cache_hits  # compiled
    assert sum(second.cache_hits.values()) == 1 and not second.cache_misses  # loaded
