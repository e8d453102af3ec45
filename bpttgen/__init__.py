"""bpttgen: derive backpropagation through time with SymPy, generate Numba trainers.

The definition API, for a definition file or a notebook:

    from bpttgen import Model, tanh, sigmoid, softmax_cross_entropy
    from bpttgen.derive import derive      # a Model's Derivation

(``bpttgen.derive`` is the subpackage, so the function derive is not re-exported here.)

Installed, the repository's folders live in this one namespace (pyproject.toml maps
them): ``bpttgen.derive`` (definition, derivation, LaTeX), ``bpttgen.codegen``
(layout, printers, rendering; ``.runtime`` what generated modules import, ``.app``
the command), ``bpttgen.generated`` (the built-in cells' modules) and
``bpttgen.templates``. ARCHITECTURE.md has the map.
"""

import os as _os

# A checkout also runs uninstalled (PYTHONPATH=the checkout, as on a GPU machine with
# nothing to install): there bpttgen.derive is the folder derive/ beside this one.
_CHECKOUT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_CHECKOUT, "pyproject.toml")) and \
        _os.path.isfile(_os.path.join(_CHECKOUT, "derive", "model.py")):
    __path__.append(_CHECKOUT)

from bpttgen.derive import (  # noqa: E402,F401 (the public definition API)
    DefinitionError, Derivation, K, Loss, Model, abs, custom_loss, d, exp, log, max,
    min, mse, relu, sigmoid, sigmoid_bce, softmax_cross_entropy, softplus, sqrt, sse, tanh, z)
from bpttgen.derive.losses import LossError  # noqa: E402,F401

__all__ = [
    "DefinitionError", "Derivation", "K", "Loss", "LossError", "Model", "abs", "custom_loss",
    "d", "exp", "log", "max", "min", "mse", "relu", "sigmoid", "sigmoid_bce",
    "softmax_cross_entropy", "softplus", "sqrt", "sse", "tanh", "z",
]
