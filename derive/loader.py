"""Find a model by built-in name or by the path of a user's definition file.

A definition file is plain Python that defines ``model()`` returning a
``derive.Model`` (or a module-level ``model`` that is one). Errors in it are
reported with its file name and line.
"""

import importlib.util
import os
import sys

from .model import DefinitionError, Model
from .models import BUILTIN, build


def load_model(spec):
    """A Model from a built-in name ('lstm') or a definition file ('cell.py')."""
    if spec in BUILTIN:
        return build(spec)
    if not (spec.endswith(".py") or os.path.sep in spec):
        raise ValueError(f"unknown model {spec!r}: not a built-in ({', '.join(BUILTIN)}) "
                         "and not a .py definition file")
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"definition file {spec!r} does not exist")
    name = "bpttgen_user_" + os.path.splitext(os.path.basename(spec))[0]
    module_spec = importlib.util.spec_from_file_location(name, spec)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except DefinitionError:
        raise
    except SyntaxError as err:
        raise DefinitionError(f"syntax error: {err.msg}",
                              location=f"{spec}:{err.lineno}") from err
    finally:
        sys.modules.pop(name, None)
    found = getattr(module, "model", None)
    if callable(found) and not isinstance(found, Model):
        found = found()
    if not isinstance(found, Model):
        raise DefinitionError(f"{spec} must define model() returning a derive.Model",
                              location=f"{spec}:1")
    return found
