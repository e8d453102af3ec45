import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import importlib

import pytest

from helpers import CASES


@pytest.fixture(scope="session", autouse=True)
def _module_cache(tmp_path_factory):
    """Modules that commands generate only to import them (bpttgen check, train,
    demo) go to a folder of this session, not the user's cache (module_cache.py)."""
    old = os.environ.get("BPTTGEN_CACHE_DIR")
    os.environ["BPTTGEN_CACHE_DIR"] = str(tmp_path_factory.mktemp("module-cache"))
    yield
    if old is None:
        os.environ.pop("BPTTGEN_CACHE_DIR", None)
    else:
        os.environ["BPTTGEN_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def generated_module(tmp_path_factory):
    """case id -> imported generated CPU module. Built-in models come from the
    committed generated/ folder; other cases are generated into a temporary folder
    once per session (Numba's cache=True then spares recompiling them)."""
    from bpttgen.codegen.generate import generate, import_path
    from bpttgen.derive.models import BUILTIN

    folder = tmp_path_factory.mktemp("generated")
    cache = {}

    def get(case):
        if case not in cache:
            if case in BUILTIN:
                cache[case] = importlib.import_module(f"bpttgen.generated.{case}")
            else:
                model = CASES[case]()
                model.name = case.replace("-", "_")
                path, = generate(model, str(folder), "pytest")
                cache[case] = import_path(path, f"bpttgen_test_{model.name}")
        return cache[case]

    return get
