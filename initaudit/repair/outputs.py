"""Output paths that can never destroy the user's model, and crash-safe writes.

An output is refused when it is, by path or by inode (so symlinks and hard links count), a file
the model reads, or lies inside a folder model's folder. Files are written under a temporary name
beside the target, fsynced and moved into place; folders are assembled in a scratch folder
beside the target and moved into place when complete. A failed write leaves no temporary file.

The final step never replaces what it did not mean to. A target absent when the run began is
published without replacing anything: a file is hard-linked to its final name (link(2) fails when
the name exists; on a file system without hard links the name is claimed with O_EXCL and the
file renamed over the claim, so a crash there can leave an empty file under the name), a folder
is renamed over an empty folder made with mkdir(2) (which fails when the name exists). Another
run that took the name meanwhile keeps it, and this write fails with one line. A target present
at the start (`-o` naming an existing file, `--in-place`) is replaced only while it is still the
same file (device, inode, size, modification time) as when the run began, before anything was
read (`Stamp`; for `--in-place`, as MODEL was read). Between that last check and the
rename, no lock is held: a writer that ignores initaudit can still change the file in that instant.
"""

from __future__ import annotations

import errno
import os
import stat
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, NamedTuple

from initaudit.common.errors import InputError

if TYPE_CHECKING:
    from initaudit.load.source import Loaded

TMP_SUFFIX = ".initaudit-tmp"
_FORMAT_SUFFIXES = {".safetensors": "safetensors", ".onnx": "onnx", ".pt": "torch", ".pth": "torch",
                    ".bin": "torch", ".ckpt": "torch", ".jit": "torch", ".tar": "torch"}
_FAMILY = {"torch-state-dict": "torch", "torch-module": "torch", "torchscript": "torch",
           "safetensors": "safetensors", "onnx": "onnx"}
_SUFFIX_FOR = {"torch": ".pt", "safetensors": ".safetensors", "onnx": ".onnx"}


class Protected:
    """What a loaded model reads: its files (by resolved path and by inode) and, for a folder model, the folder."""

    def __init__(self, loaded: Loaded):
        self.model = loaded.path
        self.paths: dict[Path, Path] = {}
        self.inodes: dict[tuple[int, int], Path] = {}
        for f in [*([loaded.path] if loaded.path else []), *loaded.files]:
            self.paths[Path(os.path.abspath(f))] = f
            self.paths[f.resolve()] = f
            try:
                st = f.stat()
            except OSError:
                continue
            if not f.is_dir():
                self.inodes[(st.st_dev, st.st_ino)] = f
        self.folder = loaded.path.resolve() if loaded.path is not None and loaded.path.is_dir() else None

    def clash(self, out: Path) -> Path | None:
        """The model file (or folder) that writing `out` would destroy, if any."""
        for candidate in (Path(os.path.abspath(out)), out.resolve()):
            if candidate in self.paths:
                return self.paths[candidate]
            if self.folder is not None and (candidate == self.folder or self.folder in candidate.parents):
                return self.model
        try:
            st = out.stat()
        except OSError:
            return None
        return self.inodes.get((st.st_dev, st.st_ino))

    def guard(self, out: Path, what: str) -> None:
        """Refuse `out` (an InputError naming what it would destroy) when it is or holds a file the model reads."""
        hit = self.clash(out)
        if hit is None:
            return
        if self.folder is not None:
            raise InputError(f"{out}: inside the model folder {self.model}; write {what} elsewhere")
        if self.model is not None and hit == self.model:
            raise InputError(f"{out}: that is MODEL itself; write {what} elsewhere"
                             + (" (or pass --in-place to replace it)" if what == "the fixed model" else ""))
        raise InputError(f"{out}: that is {hit}, which the model reads; write {what} elsewhere")


def check_suffix(loaded: Loaded, out: Path) -> None:
    """Refuse an output name whose suffix claims another format than the one `fix` writes (MODEL's own)."""
    family, claimed = _FAMILY.get(loaded.format), _FORMAT_SUFFIXES.get(out.suffix.lower())
    if family and claimed and claimed != family:
        raise InputError(f"{out}: a {out.suffix} name, but fix writes MODEL's own format ({loaded.format}); "
                         f"name it {out.with_suffix(_SUFFIX_FOR[family]).name}")


def write_error(target: Path, exc: OSError) -> InputError:
    return InputError(f"{target}: cannot write ({exc.strerror or exc})")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():  # some file systems cannot sync a folder; a file must reach the disk
            raise
    finally:
        os.close(fd)


def _mode_for(target: Path) -> int:
    """The mode a replaced file had, else what the umask gives a new one (mkstemp makes 0600)."""
    return target.stat().st_mode & 0o777 if target.exists() else 0o666 & ~_umask()


class Identity(NamedTuple):
    """Which file a name held, and which version of it: a file rewritten or replaced differs in one field."""
    device: int
    inode: int
    size: int
    modified_ns: int


def identity(path: Path) -> Identity | None:
    """The Identity of what `path` names (a link followed; a broken one, itself); None when nothing is there."""
    for stat_of in (os.stat, os.lstat):
        try:
            st = stat_of(path)
        except OSError:
            continue
        return Identity(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    return None


class Stamp:
    """What a run's output held when the run began, before anything was read: the path itself and, for a folder,
    every file under it, else every entry of its folder named after it (its companions, such as the NAME.data
    of an ONNX model). For --in-place the output is MODEL, so this is what was read."""

    def __init__(self, output: Path):
        if output.is_dir():
            paths = [output, *(Path(d, n) for d, _, names in os.walk(output) for n in names)]
        else:
            paths = [output, *(output.parent / n for n in _names(output.parent) if n.startswith(output.name))]
        self.seen = {os.path.abspath(p): identity(p) for p in paths}

    def of(self, path: Path) -> Identity | None:
        """What `path` was when the run began (None: nothing, or a name this run did not expect to write)."""
        return self.seen.get(os.path.abspath(path))

    def check(self, path: Path) -> None:
        """Refuse (one InputError line) a `path` that is no longer what it was when the run began."""
        _unchanged(path, self.of(path))


def _names(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:  # no such folder: the write will say so
        return []


@contextmanager
def atomic(target: Path, before: Stamp | None = None) -> Iterator[Path]:
    """A temporary path beside `target`, fsynced and moved into place on success, removed on failure. The final
    step replaces only the version of `target` there when the run began (`before`; else when this write
    began), and creates it, replacing nothing, where there was none."""
    _only_a_regular_file(target)
    expected = _expected(target, before)
    _unchanged(target, expected)  # early, to spare the write; the final step checks again
    try:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name[:120]}.", suffix=TMP_SUFFIX)
    except OSError as exc:
        raise write_error(target, exc) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, _mode_for(target))
        _fsync(tmp)
        _publish(tmp, target, expected)
        _fsync(target.parent)
    except OSError as exc:
        raise write_error(target, exc) from None
    finally:
        tmp.unlink(missing_ok=True)


def _only_a_regular_file(target: Path) -> None:
    """Refuse an output that exists and is not a regular file (a device such as /dev/null, a FIFO, a folder) or is
    a link (/dev/stdout's link to a descriptor, a link elsewhere): the final rename would put a file in its place."""
    try:
        st = target.lstat()
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as exc:
        raise write_error(target, exc) from None
    if stat.S_ISLNK(st.st_mode):
        raise InputError(f"{target}: a link; initaudit replaces only regular files, never a link (name the file it "
                         "leads to, or leave out -o to print the report)")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{target}: not a regular file (a device, FIFO, socket or folder); initaudit writes "
                         "only regular files, created or replaced whole (leave out -o to print the report)")


def _expected(target: Path, before: Stamp | None) -> Identity | None:
    return before.of(target) if before is not None else identity(target)


def _unchanged(target: Path, expected: Identity | None) -> None:
    """Refuse a `target` that is no longer what it was when the run began (absent, or that version)."""
    if expected is None and os.path.lexists(target):
        raise _taken(target)
    if expected is not None:
        _still(target, expected)


def _publish(tmp: Path, target: Path, expected: Identity | None) -> None:
    """Move the finished `tmp` to `target`: over the `expected` version of it, or, if none, over nothing."""
    if expected is not None:
        _still(target, expected)
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise _taken(target) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        _claim(target)  # no hard links on this file system (FAT, some network and FUSE ones)
        os.replace(tmp, target)


def _claim(target: Path) -> None:
    """Create `target` empty, failing when the name exists (O_EXCL): the name is then this run's to replace."""
    try:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        raise _taken(target) from None


def _still(target: Path, expected: Identity) -> None:
    if identity(target) != expected:
        raise InputError(f"{target}: changed after initaudit started (another program wrote it); not replaced, "
                         "run initaudit again")


def _taken(target: Path) -> InputError:
    return InputError(f"{target}: appeared after initaudit started (another run or program took the name); "
                      "not replaced, this run's output was discarded")


@contextmanager
def atomic_folder(target: Path, before: Stamp | None = None) -> Iterator[Path]:
    """A scratch folder beside `target` (which must be absent or empty), moved to it when complete: over the
    empty folder there when the run began (`before`; else when this write began), else over a new empty one
    this run makes (never over another run's)."""
    expected = _expected(target, before)
    _unchanged(target, expected)
    if target.is_dir() and any(target.iterdir()):
        raise InputError(f"{target}: a folder that is not empty; give a new folder name for the fixed model")
    try:
        scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name[:120]}.", suffix=TMP_SUFFIX))
    except OSError as exc:
        raise write_error(target, exc) from None
    try:
        yield scratch
        for item in scratch.iterdir():
            _fsync(item)
        os.chmod(scratch, 0o777 & ~_umask())
        if expected is None:
            _claim_folder(target)
        else:
            _still(target, expected)
        os.replace(scratch, target)  # rename(2) replaces an empty folder, fails on one that is not
        _fsync(target.parent)
    except OSError as exc:
        raise write_error(target, exc) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _claim_folder(target: Path) -> None:
    try:
        os.mkdir(target, 0o700)
    except FileExistsError:
        raise _taken(target) from None


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
