"""Output paths that can never destroy the user's model, and crash-safe writes.

An output is refused when it is, by path or by inode (so symlinks and hard links count), a file
the model reads, or lies inside a folder model's folder. Files are written under a temporary name
beside the target, fsynced and renamed into place; folders are assembled in a scratch folder
beside the target and renamed into place when complete. A failed write leaves no temporary file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from .errors import InputError

if TYPE_CHECKING:
    from .loaders import Loaded

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


@contextmanager
def atomic(target: Path) -> Iterator[Path]:
    """A temporary path beside `target`, fsynced and renamed over it on success, removed on failure."""
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
        os.replace(tmp, target)
        _fsync(target.parent)
    except OSError as exc:
        raise write_error(target, exc) from None
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """A scratch folder beside `target` (which must be absent or empty), renamed to it when complete."""
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
        os.replace(scratch, target)  # rename(2) replaces an empty folder
        _fsync(target.parent)
    except OSError as exc:
        raise write_error(target, exc) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
