"""Where a conversion writes DST: the checks on what it may replace, a lock held for the whole run, the temporary
folder the output is built in, and the final move into place.

Beside DST `out` live `.out.lock` (an flock, holding the running conversion's pid), `.out.<pid>.tmp` (the output
being built) and, for an instant during a --force replacement, `.out.<pid>.old`. Only the lock's holder makes them,
so whoever holds the lock knows that any other such folder was left by a dead run.
"""

import fcntl
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ..loading import read_json_object

# What a diffusers / mlximg model folder holds besides the component folders its model_index.json names (and
# LICENSE* files); --force replaces such a folder or an empty one, never anything else.
MODEL_FILES = frozenset({"model_index.json", "README.md", ".gitattributes", "mlximg.json"})


def check_apart(dst: Path, src_root: Path, tree: list[Path]) -> None:
    """`dst` must not be, hold or lie inside the source or anything the source reaches (symlinks resolved): the
    conversion writes beside DST and a replacement deletes it."""
    for path in (src_root, *tree):
        real = path.resolve()
        if real == dst or dst in real.parents or real in dst.parents:
            relation = "is" if real == dst else "holds" if dst in real.parents else "lies inside"
            what = "the source" if path == src_root else f"{real}, which the source {src_root} reaches via {path}"
            raise ValueError(f"destination {dst} {relation} {what}; choose a destination outside the source")


def check_replaceable(dst: Path) -> None:
    """What --force may replace: an empty folder, or a model folder holding nothing but a model folder's entries."""
    if not dst.is_dir():
        raise ValueError(f"refusing to replace {dst}: not a folder")
    entries = sorted(dst.iterdir())
    if not entries:
        return
    index = dst / "model_index.json"
    if not index.is_file():
        raise ValueError(f"refusing to replace {dst}: it is not empty and not a model folder (no model_index.json)")
    components = {name for name, value in read_json_object(index).items() if isinstance(value, list)}
    for entry in entries:
        if entry.is_dir() and entry.name in components:
            continue
        if entry.is_file() and (entry.name in MODEL_FILES or entry.name.startswith("LICENSE")):
            continue
        raise ValueError(f"refusing to replace {dst}: {entry.name} is not part of a model folder (--force replaces "
                         f"only a model folder or an empty folder; move it away first)")


@contextmanager
def locked(dst: Path) -> Iterator[None]:
    """Hold `.DST.lock` for the whole conversion; a second run on DST fails at once, naming this one's pid. The
    system releases an flock when its process dies, so a killed run never leaves DST locked."""
    path = dst.parent / f".{dst.name}.lock"
    fd = _take_lock(path, dst)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked: a run that opened it meanwhile sees a stale inode
        os.close(fd)


def _take_lock(path: Path, dst: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FileExistsError(f"{dst} is being written by another conversion (pid {holder}, lock {path})") from None
        if _is_current(fd, path):
            return fd
        os.close(fd)  # its holder removed it between our open and our lock: lock the file now at `path`


def _is_current(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def remove_stale(dst: Path, log: Callable[[str], None]) -> None:
    """Remove the temporary folders of DST that dead runs left; call it holding the lock (a live run would hold it)."""
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.(\d+)\.(?:tmp|old)")
    for entry in sorted(dst.parent.iterdir()):
        if (match := pattern.fullmatch(entry.name)) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
            log(f"removed stale temporary folder {entry} left by an interrupted run (pid {match[1]})")


def make_temporary(dst: Path) -> Path:
    """The folder the output is built in: beside DST, so the final move is a rename; made by mkdir, so DST gets the
    usual permissions (0o777 & ~umask; tempfile.mkdtemp's are 0o700)."""
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.tmp"
    tmp.mkdir()
    return tmp


def publish(tmp: Path, dst: Path, force: bool) -> None:
    """Move the finished `tmp` to `dst`, checking DST again: something may have made it during the conversion. An
    existing DST is replaced only with `force`, and removed only once the new one is in place."""
    if not dst.exists():
        # A rename fails onto anything but an empty folder, so one appearing after this check loses nothing.
        os.rename(tmp, dst)
        return
    if not force:
        raise FileExistsError(f"{dst} appeared during the conversion; pass --force to replace it")
    check_replaceable(dst)
    old = tmp.with_suffix(".old")
    os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    shutil.rmtree(old)
