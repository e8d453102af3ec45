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

from bpttgen.derive import (  # noqa: F401 (the public definition API)
    DefinitionError, Derivation, K, Loss, Model, abs, custom_loss, d, exp, log, max,
    min, mse, relu, sigmoid, sigmoid_bce, softmax_cross_entropy, softplus, sqrt, sse, tanh, z)
from bpttgen.derive.losses import LossError  # noqa: F401

__all__ = [
    "DefinitionError", "Derivation", "K", "Loss", "LossError", "Model", "abs", "custom_loss",
    "d", "exp", "log", "max", "min", "mse", "relu", "sigmoid", "sigmoid_bce",
    "softmax_cross_entropy", "softplus", "sqrt", "sse", "tanh", "z",
]
