"""Where the commands that generate a module only to import it (``bpttgen check``,
``bpttgen train MODEL_FILE``, ``bpttgen demo``) put it: a folder per source, named by
the source's digest, under the user's cache folder.

Why not a new temporary folder each time: Numba caches a module's compiled kernels
beside its file, keyed by the file's path and its stamp (modification time and
size). A new folder is a new path, so every run compiled every kernel again (every
``bpttgen check lstm`` took 8.8-9.4 s on a 2-core Xeon; 1.8-1.9 s from its second run
now); here the same source has the same path, is written once and never touched
again, and a second run loads its kernels. A changed definition is a changed source, hence a new folder: nothing stale
is ever loaded. The least recently used folders beyond ``KEEP`` are removed.

The folder: ``$BPTTGEN_CACHE_DIR``, else ``$XDG_CACHE_HOME/bpttgen/modules``, else
``~/.cache/bpttgen/modules``. Where it cannot be written, ``module_path`` returns
None and the caller uses a temporary folder, as before.
"""

import hashlib
import os
import shutil
import uuid

#: Folders kept (each a module's source and its compiled kernels, 2-10 MB).
KEEP = 32


def folder():
    """The cache folder of generated modules (not created here)."""
    given = os.environ.get("BPTTGEN_CACHE_DIR")
    if given:
        return given
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                            ".cache")
    return os.path.join(base, "bpttgen", "modules")


def module_path(filename, source, keep=KEEP):
    """The path of ``filename`` holding ``source`` in the cache, written there unless
    it already is (so its stamp, and Numba's cache of it, stay valid); None when the
    cache folder cannot be written."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    home = os.path.join(folder(), digest)
    path = os.path.join(home, filename)
    try:
        os.makedirs(home, exist_ok=True)
        if not _holds(path, source):
            # Its own temporary name, then an atomic rename: two processes writing the
            # same module never leave half a file.
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "x") as f:
                f.write(source)
            os.replace(tmp, path)
        os.utime(home)  # the folder's time says when it was last used
    except OSError:
        return None
    _prune(keep)
    return path


def _holds(path, source):
    try:
        with open(path) as f:
            return f.read() == source
    except OSError:
        return False


def _prune(keep):
    """Remove the least recently used folders beyond ``keep``."""
    root = folder()
    try:
        entries = [e for e in os.scandir(root) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return
    entries.sort(key=lambda e: e.stat().st_mtime, reverse=True)
    for entry in entries[keep:]:
        shutil.rmtree(entry.path, ignore_errors=True)
