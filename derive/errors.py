"""Errors of a model definition, located at the user's line.

The definition API (model.py) and the losses (losses.py) raise these; both import
this module and nothing else of each other's, so the two stay free of a cycle.
"""

import os
import traceback

_HERE = os.path.dirname(os.path.abspath(__file__))


class DefinitionError(ValueError):
    """A model definition that cannot be derived; names the line and symbol."""

    def __init__(self, message, location=None):
        self.location = location or _caller_location()
        where = f"{self.location}: " if self.location else ""
        super().__init__(where + message)


def _caller_location():
    """'file:line' of the innermost frame outside derive/'s engine modules.

    Built-in definitions in derive/models/ count as user code: an error in one
    should point at its line too.
    """
    for frame in reversed(traceback.extract_stack()):
        if frame.filename == "<string>" and frame.name == "__init__":
            continue  # a dataclass's generated __init__ (derive.Loss's checks)
        path = os.path.abspath(frame.filename)
        if os.path.dirname(path) != _HERE:
            return f"{frame.filename}:{frame.lineno}"
    return None


#: The top-level packages of bpttgen before its namespace, and the message for them.
OLD_PACKAGES = ("derive", "codegen", "generated", "templates")
MOVED = "bpttgen's packages live under bpttgen"


def old_import_message(package):
    """What to write instead of an import of bpttgen's old top-level ``package``."""
    return (f"{MOVED} now: write 'from bpttgen import Model, tanh, ...' (the definition "
            f"API) or 'from bpttgen.{package} import ...' instead of 'from {package} "
            "import ...'")
