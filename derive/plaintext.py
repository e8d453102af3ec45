"""The LaTeX that derive/latex.py prints, as plain Unicode text for a terminal.

latex.py prints a bounded vocabulary (bold vectors, fractions, sums, bars and dots
over symbols, Greek letters, a few operators and functions); this reads exactly that
vocabulary and writes what a reader of a terminal expects:

    \\mathbf{h}_{t} = \\mathbf{o}_{t} \\odot \\tanh{\\left(\\mathbf{c}_{t} \\right)}
    h_t = o_t ⊙ tanh(c_t)

A control sequence it does not know raises ValueError naming it, so a new construct
in latex.py fails the tests (tests/test_latex.py prints every built-in and fuzz
cells in this form) instead of leaking backslashes to the terminal.
"""

import re
import unicodedata

_WORDS = {
    "delta": "δ", "lambda": "λ", "sigma": "σ", "tau": "τ", "theta": "θ", "kappa": "κ",
    "varepsilon": "ε", "epsilon": "ε", "eta": "η", "alpha": "α", "beta": "β",
    "gamma": "γ", "mu": "μ", "nu": "ν", "xi": "ξ", "pi": "π", "rho": "ρ", "phi": "φ",
    "chi": "χ", "psi": "ψ", "omega": "ω", "zeta": "ζ", "iota": "ι", "upsilon": "υ",
    "Gamma": "Γ", "Delta": "Δ", "Theta": "Θ", "Lambda": "Λ", "Xi": "Ξ", "Pi": "Π",
    "Sigma": "Σ", "Upsilon": "Υ", "Phi": "Φ", "Psi": "Ψ", "Omega": "Ω",
    "partial": "∂", "odot": "⊙", "top": "ᵀ", "sum": "Σ", "prod": "∏", "le": "≤", "ge": "≥",
    "sim": "~", "leftarrow": "←", "cdot": "·", "times": "×", "dots": "...",
    "ldots": "...", "infty": "∞", "quad": "  ", "qquad": "    ", "nonumber": "",
    "tanh": "tanh", "sinh": "sinh", "cosh": "cosh", "log": "log", "exp": "exp",
    "max": "max", "min": "min", "operatorname": None, "mathbf": None, "boldsymbol": None,
    "mathit": None, "mathrm": None, "text": None,
}
_BRACKETS = {"left", "right", "bigl", "bigr", "Bigl", "Bigr"}
_ACCENTS = {"bar": "\u0304", "overline": "\u0304", "dot": "\u0307", "tilde": "\u0303",
            "hat": "\u0302"}
_SUPERSCRIPTS = str.maketrans("0123456789+-()", "⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻⁽⁾")
_SYMBOL_END = re.compile(r"[\w\u0300-\u036f}ᵀ⁰¹²³⁴⁵⁶⁷⁸⁹]$")
_TOKEN = re.compile(r"\\[A-Za-z]+|\\.|[{}^_]|[^\\{}^_]+")


def to_text(tex):
    """Plain text of a LaTeX math string from latex.py."""
    tokens = _TOKEN.findall(tex)
    text, end = _sequence(tokens, 0)
    if end != len(tokens):
        raise ValueError(f"unbalanced braces in {tex!r}")
    text = re.sub(r" {2,}(?=\S)", lambda m: m.group(0) if len(m.group(0)) > 3 else " ", text)
    text = re.sub(r"([(∂]) +", r"\1", re.sub(r" +\)", ")", text))
    return re.sub(r"\(- ", "(-", text).strip()


def _sequence(tokens, i, closing=False):
    out = []
    while i < len(tokens):
        token = tokens[i]
        if token == "}":
            if closing:
                return "".join(out), i + 1
            raise ValueError("unbalanced '}'")
        piece, i = _atom(tokens, i)
        # Juxtaposed symbols are a product in LaTeX (W x): keep them apart in text.
        if out and piece[:1].isalpha() and _SYMBOL_END.search(out[-1]) and \
                token.startswith("\\") and token[1:] not in _BRACKETS:
            out.append(" ")
        out.append(piece)
    if closing:
        raise ValueError("unbalanced '{'")
    return "".join(out), i


def _argument(tokens, i):
    """One argument: a braced group or a single token."""
    if i < len(tokens) and tokens[i] == "{":
        return _sequence(tokens, i + 1, closing=True)
    if i < len(tokens) and not tokens[i].startswith("\\") and len(tokens[i]) > 1:
        first, tokens[i] = tokens[i][0], tokens[i][1:]  # x_t = ...: the script is t
        return first, i
    return _atom(tokens, i)


def _atom(tokens, i):
    token = tokens[i]
    if token == "{":
        return _sequence(tokens, i + 1, closing=True)
    if token in ("_", "^"):
        script, i = _argument(tokens, i + 1)
        return _script(token, script), i
    if not token.startswith("\\"):
        return token, i + 1
    word = token[1:]
    if word in _BRACKETS:  # \left( -> (, \right. -> nothing
        following = tokens[i + 1] if i + 1 < len(tokens) else ""
        delimiter = following[:1]
        rest = following[1:]
        if delimiter == "\\":  # \left\{ and the like
            return following[1:], i + 2
        tokens[i + 1] = rest
        return ("" if delimiter == "." else delimiter), i + 1 + (not rest)
    if word == "frac":
        top, i = _argument(tokens, i + 1)
        bottom, i = _argument(tokens, i)
        return f"{_grouped(top)}/{_grouped(bottom)}", i
    if word == "sqrt":
        body, i = _argument(tokens, i + 1)
        return f"√{_grouped(body)}", i
    if word in _ACCENTS:
        body, i = _argument(tokens, i + 1)
        if len(body) == 1:
            return body + _ACCENTS[word], i
        return f"{'bar' if word == 'overline' else word}({body})", i
    if word == "tag":
        number, i = _argument(tokens, i + 1)
        return f"    ({number})", i
    if word not in _WORDS and len(word) == 1:  # \{ \} \, \; \!
        return {"{": "{", "}": "}", "_": "_", "%": "%", "&": "&", "#": "#"}.get(word, ""), i + 1
    if word not in _WORDS:
        raise ValueError(f"plaintext: no text form for \\{word}")
    if _WORDS[word] is None:  # a font or operator name: its argument as it is
        return _argument(tokens, i + 1)
    return _WORDS[word], i + 1


def _script(mark, script):
    if mark == "^":
        if script == "ᵀ":
            return script
        if all(c in "0123456789+-()" for c in script):
            return script.translate(_SUPERSCRIPTS)
        return "^" + _grouped(script)
    return "_" + (script if re.fullmatch(r"\w", script) else "{" + script + "}")


def _grouped(text):
    """text, bracketed when it is more than one symbol (a/(b + c), √(x + 1))."""
    text = text.strip()
    if re.fullmatch(r"(∂ ?)?[\w\u0300-\u036f.ᵀ⁰¹²³⁴⁵⁶⁷⁸⁹]+(_\w|_\{[^{}]*\})?", text):
        return text
    if text.startswith("(") and text.endswith(")") and _balanced(text[1:-1]):
        return text
    return f"({text})"


def _balanced(text):
    depth = 0
    for c in text:
        depth += {"(": 1, ")": -1}.get(c, 0)
        if depth < 0:
            return False
    return depth == 0


def width(text):
    """Columns text takes in a terminal: combining accents (h̄) take none."""
    return sum(not unicodedata.combining(c) for c in text)
