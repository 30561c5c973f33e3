"""The file policy of every loader: only regular files are read (a FIFO, socket or device file is
refused before anything opens it), and every file a model refers to (ONNX external data, a Hugging
Face folder's config, index and weights) lies inside the model's folder: paths and links leaving it
are refused, for every format alike. The MODEL path the user typed may itself be a link.

One layout widens "inside" for links, not for paths: a Hugging Face cache snapshot
(`models--org--name/snapshots/<revision>/`), whose files are links into `models--org--name/blobs/`.
There a link may lead anywhere inside its `models--*` folder, and a file typed as MODEL is held to
the same bound; a link leaving it (to another cached model, to /etc...) is refused."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from initaudit.common.errors import InputError


def status(path: Path) -> os.stat_result:
    """`path.stat()` (links followed), every OSError (missing, name too long, no permission, a link
    loop) answered as one InputError line naming the path."""
    try:
        return path.stat()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file or directory") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise InputError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None


def _what(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def regular(path: Path, shown: Path | None = None) -> os.stat_result:
    """The stat of `path` if it is a regular file; anything else is refused without opening it."""
    st = status(path)
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{shown or path}: {_what(st.st_mode)}; initaudit reads only regular files")
    return st


def model_kind(path: Path) -> str:
    """'file' or 'folder' for the MODEL the user typed (itself possibly a link); anything else is refused.
    A file in a Hugging Face cache snapshot must resolve inside its cached repository."""
    st = status(path)
    if stat.S_ISDIR(st.st_mode):
        return "folder"
    regular(path)
    if cached_repo(_resolved(path.parent, path.parent)) is not None:
        inside(path.parent, path.name, path)
    return "file"


def cached_repo(folder: Path) -> Path | None:
    """The `models--*` folder of a Hugging Face cache holding the real `folder` in one of its snapshots, if any."""
    for parent in folder.parents:
        if parent.name == "snapshots" and parent.parent.name.startswith("models--"):
            return parent.parent
    return None


def cache_link(path: Path) -> bool:
    """Whether `path` is a link in a Hugging Face cache snapshot to a regular file inside its `models--*` folder."""
    try:
        return (path.is_symlink() and cached_repo(_resolved(path.parent, path)) is not None
                and bool(inside(path.parent, path.name, path)))
    except InputError:
        return False


def inside(folder: Path, name: str, referrer: Path) -> Path:
    """The real path of the regular file `name` (relative to the model's `folder`) that `referrer`
    points to, when it is `within` the folder's bounds; else one InputError line."""
    target = within(folder, name, referrer)
    regular(target, folder / name)
    return target


def within(folder: Path, name: str, referrer: Path) -> Path:
    """The real path `name` (relative to the model's `folder`) leads to, when the name stays inside the
    folder and the links on the way do too (in a Hugging Face cache snapshot: inside its `models--*`
    folder); else one InputError line."""
    shown = folder / name
    root = _resolved(folder, shown)
    if not name or root not in Path(os.path.normpath(root / name)).parents:
        raise InputError(f"{referrer}: refers to {name!r}, outside the model's folder; only files inside it are read")
    target = _resolved(root / name, shown)
    bound = cached_repo(root) or root
    if bound not in target.parents:
        where = "cached model's folder" if bound != root else "model's folder"
        raise InputError(f"{shown}: leads outside the {where} {bound}; links and paths leaving it are not "
                         "followed (copy the model with its links resolved, e.g. cp -rL, to check it)")
    return target


def _resolved(path: Path, shown: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # RuntimeError: a link loop
        raise InputError(f"{shown}: cannot be resolved ({getattr(exc, 'strerror', None) or exc})") from None
