"""Training curves as a PNG, headless (matplotlib's Agg canvas), written atomically.

Used by ``Trainer.plot``, ``bpttgen train --plot`` and the demo. matplotlib is loaded
on the first plot, so importing a generated module stays as fast as before.
"""

import os
import tempfile


def plot_curves(curves, path, *, baseline=None, baseline_label="no memory",
                xlabel="epoch", ylabel="training loss", title=None, size=(6.0, 4.0),
                dpi=100):
    """Write ``{label: losses}`` as one line each (and ``baseline`` as a dashed line)
    to the PNG ``path``; returns ``path``. The image is size * dpi pixels."""
    # A bare Figure saves through the Agg canvas: no pyplot, no display, and the
    # backend a notebook has chosen is left as it is.
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    ax = fig.add_subplot()
    for label, losses in curves.items():
        losses = list(losses)
        ax.plot(range(1, len(losses) + 1), losses, marker="o" if len(losses) < 40 else None,
                label=label)
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", label=baseline_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".png")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp's file is private; a plot is for anyone to open
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)  # a reader never sees half a PNG
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
