"""bpttgen's symbolic side: define a recurrent model, derive its BPTT.

    from bpttgen.derive import Model, tanh, derive
    m = Model("cell", sizes=("I", "H", "O"))
    ...
    derivation = derive(m)

Data flow: model.py (definition) -> derivation.py (Derivation) -> latex.py /
codegen/. reference.py evaluates a Derivation in plain NumPy.
"""

if __name__.split(".")[0] == "derive":  # a checkout's folder imported as the old top level
    from bpttgen.derive.errors import old_import_message

    raise ImportError(old_import_message("derive"), name="derive")

from .derivation import Derivation, derive
from .functions import relu as relu_function, sigmoid as sigmoid_function
from .losses import K, Loss, custom_loss, d, mse, sigmoid_bce, softmax_cross_entropy, sse, z
from .model import DefinitionError, Model, exp, log, relu, sigmoid, softplus, sqrt, tanh
from .model import absolute as abs  # noqa: A001 (elementwise, like tanh)
from .model import maximum as max  # noqa: A001
from .model import minimum as min  # noqa: A001

__all__ = [
    "Derivation", "DefinitionError", "K", "Loss", "Model", "abs", "custom_loss", "d",
    "derive", "exp", "log", "max", "min", "mse", "relu", "relu_function", "sigmoid",
    "sigmoid_bce", "sigmoid_function", "softmax_cross_entropy", "softplus", "sqrt", "sse",
    "tanh", "z",
]
