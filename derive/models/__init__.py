"""Built-in models: each a short definition using only derive's public API.

``BUILTIN`` maps the name of a generated module to a function that builds it;
adding a model here adds it to generation and to every registry-driven test.
"""

from .bidirectional import bielman
from .deep import deep
from .elman import elman
from .embed import embed_lstm
from .gru import gru
from .lstm import lstm
from .normed import layernorm_lstm, rmsnorm
from .stacked import stacked_elman

BUILTIN = {
    "elman": elman,
    "elman_sigmoid": lambda: elman(activation="sigmoid", name="elman_sigmoid"),
    "lstm": lstm,
    "gru": gru,
    "deep": deep,
    "elman2": lambda: stacked_elman(layers=2),
    "lstm2": lambda: lstm(layers=2),
    "layernorm_lstm": layernorm_lstm,
    "rmsnorm": rmsnorm,
    "bielman": bielman,
    "embed_lstm": embed_lstm,
}


def build(name):
    """The model definition of a built-in by name."""
    if name not in BUILTIN:
        raise KeyError(f"unknown model {name!r}; built-in models: {', '.join(BUILTIN)}")
    return BUILTIN[name]()
