"""Progress bars: tqdm's, the one people know, behind the small interface the trainer,
the demo and the CLI use (``update(loss)``, ``close()``).

Shown on a terminal and in a notebook; silent when the stream is a pipe or a file
(logs and CI stay clean) and when disabled (``--quiet``, ``progress=False``).
"""

import sys

from tqdm import tqdm


class Progress:
    """A bar over ``total`` steps, with the last loss beside it."""

    def __init__(self, total, enabled=True, label="", stream=None):
        stream = stream or sys.stderr
        interactive = getattr(stream, "isatty", lambda: False)() or "ipykernel" in sys.modules
        self._bar = tqdm(total=total, desc=label or None, file=stream, leave=True,
                         disable=not (enabled and interactive), mininterval=0.1,
                         dynamic_ncols=True)

    def update(self, loss=None, n=1):
        if loss is not None:
            self._bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)
        self._bar.update(n)

    def close(self):
        self._bar.close()
