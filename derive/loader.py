"""Find a model by built-in name or by the path of a user's definition file.

A definition file is plain Python that defines ``model()`` returning a
``bpttgen.Model`` (or a module-level ``model`` that is one). Errors in it are
reported with its file name and line.
"""

import importlib.util
import os
import sys
import traceback

from .errors import MOVED, OLD_PACKAGES, old_import_message
from .losses import LossError
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
        found = getattr(module, "model", None)
        if callable(found) and not isinstance(found, Model):
            found = found()
    except (DefinitionError, LossError):  # already located in the file
        raise
    except ImportError as err:
        if err.name in OLD_PACKAGES or str(err).startswith(MOVED):
            raise DefinitionError(old_import_message(err.name or "derive"),
                                  location=_location_in(err, spec)) from err
        raise DefinitionError(f"{type(err).__name__}: {err}",
                              location=_location_in(err, spec)) from err
    except SyntaxError as err:
        raise DefinitionError(f"syntax error: {err.msg}",
                              location=f"{spec}:{err.lineno}") from err
    except Exception as err:  # noqa: BLE001 - any error in the user's file, located
        raise DefinitionError(f"{type(err).__name__}: {err}",
                              location=_location_in(err, spec)) from err
    finally:
        sys.modules.pop(name, None)
    if not isinstance(found, Model):
        raise DefinitionError(f"{spec} must define model() returning a bpttgen.Model",
                              location=f"{spec}:1")
    return found


def _location_in(err, spec):
    """'spec:line' of the innermost frame of err's traceback in the file spec."""
    target = os.path.abspath(spec)
    line = 1
    for frame in traceback.extract_tb(err.__traceback__):
        if os.path.abspath(frame.filename) == target:
            line = frame.lineno
    return f"{spec}:{line}"
