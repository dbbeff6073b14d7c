"""Files written crash-safely: checkpoints, sample and eval outputs, benchmark results."""
from __future__ import annotations

import os
import stat
import tempfile


def _fsync_dir(path: str):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    # reading the umask means setting it: set it straight back
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def atomic_write(path: str, write):
    """Call write(tmp_path), then rename tmp_path over path (same directory, so the rename is atomic): an existing
    file is replaced whole or kept as it was. A symlink's target is written and the link kept. The file gets the
    mode an existing one had, else the one open() would give a new file (0666 & ~umask): mkstemp's 0600, which
    os.replace keeps, made outputs unreadable to the group."""
    path = os.path.realpath(path)
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode) if os.path.exists(path) else 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(d)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_file(path: str, write, mode: str = "wb"):
    """write(file) on the temporary file opened with `mode`, then renamed over path (atomic_write)."""
    def to_file(tmp):
        with open(tmp, mode) as f:
            write(f)

    atomic_write(path, to_file)
