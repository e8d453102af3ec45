"""bpttgen's symbolic side: define a recurrent model, derive its BPTT.

    from derive import Model, tanh, derive
    m = Model("cell", sizes=("I", "H", "O"))
    ...
    derivation = derive(m)

Data flow: model.py (definition) -> derivation.py (Derivation) -> latex.py /
codegen/. reference.py evaluates a Derivation in plain NumPy.
"""

from .derivation import Derivation, derive
from .functions import relu as relu_function, sigmoid as sigmoid_function
from .losses import Loss, custom_loss, mse, sigmoid_bce, softmax_cross_entropy, sse
from .model import DefinitionError, Model, exp, log, relu, sigmoid, softplus, tanh

__all__ = [
    "Derivation", "DefinitionError", "Loss", "Model", "custom_loss", "derive", "exp", "log",
    "mse", "relu", "relu_function", "sigmoid", "sigmoid_bce", "sigmoid_function",
    "softmax_cross_entropy", "softplus", "sse", "tanh",
]
