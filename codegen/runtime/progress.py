"""Progress bars: tqdm's, the one people know, behind the small interface the trainer,
the demo and the CLI use (``update(loss)``, ``close()``).

Shown on a terminal and in a notebook; silent when the stream is a pipe or a file
(logs and CI stay clean) and when disabled (``--quiet``, ``progress=False``).
"""

import sys

from tqdm import tqdm


class Progress:
    """A bar over ``total`` steps, with the last loss beside it (and the last held-out
    loss, once ``held_out`` is set)."""

    def __init__(self, total, enabled=True, label="", stream=None):
        stream = stream or sys.stderr
        interactive = getattr(stream, "isatty", lambda: False)() or "ipykernel" in sys.modules
        self._bar = tqdm(total=total, desc=label or None, file=stream, leave=True,
                         disable=not (enabled and interactive), mininterval=0.1,
                         dynamic_ncols=True)
        self.held_out = None

    def update(self, loss=None, n=1):
        if loss is not None:
            held = "" if self.held_out is None else f", held-out {self.held_out:.4f}"
            self._bar.set_postfix_str(f"loss {loss:.4f}{held}", refresh=False)
        self._bar.update(n)

    def close(self):
        self._bar.close()
