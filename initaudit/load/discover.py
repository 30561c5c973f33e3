"""Which models a run covers: the PATH arguments expanded into model files and folders, without torch.

A file named on the command line is taken as it is; a folder holding `config.json` (Hugging Face,
timm) or `.metadata` with `*.distcp` shards (a torch.distributed checkpoint) is one model; any other
folder is walked, and a file in it counts as a model when its first bytes say so (a torch zip or
legacy pickle, a safetensors header, an ONNX protobuf), whatever its name, and so does a file named like
a model (`.pt`, `.pth`, `.ckpt`, `.safetensors`, `.onnx`), whatever its bytes, so that a truncated or
overwritten checkpoint is reported as unreadable instead of skipped. A pattern with `*`, `?` or `[` that
names no existing path is a glob (`**` recursive, `*` skipping hidden names, as glob.glob has them); the
files it matches are taken as a walk's are (`models/*` skips a README), and like a walk it follows no link:
below the pattern's fixed leading folders (which may be links the user typed) links are neither matched nor
entered. A file reached twice (named twice, or through a link the user typed) is audited once, by its real
path. A `scheme://...` address is passed to the loader untouched. Folders and files matching `exclude`
(ruff's defaults unless replaced) or `extend-exclude` are skipped while walking and globbing, never when
named outright.
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

from initaudit.common.errors import InputError
from initaudit.load.files import cache_link, model_kind
from initaudit.load.paths import folder_kind, is_remote, looks_like_model

# ruff's default exclusions: tool caches, virtual environments, build output, VCS folders.
DEFAULT_EXCLUDE = (".bzr", ".direnv", ".eggs", ".git", ".git-rewrite", ".hg", ".ipynb_checkpoints", ".mypy_cache",
                   ".nox", ".pants.d", ".pyenv", ".pytest_cache", ".pytype", ".ruff_cache", ".svn", ".tox", ".venv",
                   ".vscode", "__pypackages__", "_build", "buck-out", "build", "dist", "node_modules",
                   "site-packages", "venv")
_GLOB = re.compile(r"[*?[]")
# Names that say "model": such a file is checked even when its bytes are not one (`.bin` is too common for data).
MODEL_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".onnx")


class Excluder:
    """ruff-style exclusion: a glob matched against an entry's name and its path (relative or absolute)."""

    def __init__(self, exclude: list[str] | None = None, extend: list[str] | None = None):
        self.patterns = [*(DEFAULT_EXCLUDE if exclude is None else exclude), *(extend or [])]

    def __call__(self, path: Path) -> bool:
        names = {path.name, path.as_posix(), path.absolute().as_posix()}
        return any(fnmatch.fnmatchcase(name, pattern.rstrip("/")) for pattern in self.patterns for name in names)


def expand(args: list[str | Path], excluded: Excluder | None = None,
           problems: list[tuple[str, InputError]] | None = None) -> list[str | Path]:
    """The models the PATH arguments name, in the order given, each once. An argument that names nothing
    readable raises InputError, or, given a `problems` list, is recorded there and skipped."""
    excluded = excluded or Excluder()
    found: list[str | Path] = []
    for arg in args:
        try:
            found.extend(_expand_one(str(arg), excluded))
        except InputError as exc:
            if problems is None:
                raise
            problems.append((str(arg), exc))
    return _unique(found)


def _expand_one(text: str, excluded: Excluder) -> list[str | Path]:
    if is_remote(text):
        return [text]
    if _GLOB.search(text) and not os.path.lexists(text):
        matches = [m for m in _glob(text) if not any(excluded(p) for p in (m, *m.parents))]
        if not matches:
            raise InputError(f"{text}: no such file or directory (and no file matches it as a pattern)")
        found = [item for m in matches if m.is_dir() or _model_file(m)
                 for item in (_walk(m, excluded) if m.is_dir() and folder_kind(m) is None else [m])]
        if not found:
            raise InputError(f"{text}: no model file matches it as a pattern")
        return found
    path = Path(text)
    is_folder = model_kind(path) == "folder"  # a missing path, FIFO or device is refused here, before torch
    return _walk(path, excluded) if is_folder and folder_kind(path) is None else [path]


def _glob(pattern: str) -> list[Path]:
    """The paths `pattern` matches, sorted, as glob.glob(recursive=True) gives them but following no link: after
    the pattern's fixed leading folders, a link is neither entered nor matched (but for a cache snapshot's link
    to its blob, as in a walk)."""
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if _GLOB.search(part))
    segments = [s for i, s in enumerate(parts[fixed:], fixed) if s != "**" or parts[i - 1:i] != ("**",)]
    return sorted(set(_matches(Path(*parts[:fixed]), segments)))


def _matches(folder: Path, segments: list[str]) -> Iterator[Path]:
    """What `segments` (`**`: any number of folders) match below `folder`; `*` and `**` skip hidden names."""
    if not segments:
        yield folder
        return
    head, rest = segments[0], segments[1:]
    if head == "**":
        yield from _matches(folder, rest)
        for sub in _subfolders(folder):
            yield from _matches(sub, segments)
        return
    for entry in _entries(folder):
        path = folder / entry.name
        if not fnmatch.fnmatch(entry.name, head) or (entry.name.startswith(".") and not head.startswith(".")):
            continue
        if rest and entry.is_dir(follow_symlinks=False):
            yield from _matches(path, rest)
        elif not rest and (not entry.is_symlink() or cache_link(path)):
            yield path


def _subfolders(folder: Path) -> list[Path]:
    """The folders `**` enters below `folder`: real ones (not links), not hidden, as a walk would."""
    names = [e.name for e in _entries(folder) if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
    return [folder / name for name in _cached_models(folder, names)]


def _entries(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError:  # not a folder, gone, no permission: nothing matches there
        return []


def _walk(root: Path, excluded: Excluder) -> list[Path]:
    """Model files and model folders under `root`, sorted; links are not followed, excluded entries skipped."""
    found: list[Path] = []
    for folder, dirs, files in os.walk(root, onerror=None, followlinks=False):
        here = Path(folder)
        keep = []
        for name in sorted(_cached_models(here, dirs)):
            sub = here / name
            if excluded(sub) or sub.is_symlink():
                continue
            if folder_kind(sub) is not None:
                found.append(sub)
            else:
                keep.append(name)
        dirs[:] = keep
        for name in sorted(files):
            path = here / name
            if not excluded(path) and _model_file(path):
                found.append(path)
    if not found:
        raise InputError(f"{root}: no model files in this folder (nor in its subfolders)")
    return sorted(found)


def _cached_models(folder: Path, subfolders: list[str]) -> list[str]:
    """The subfolders a walk enters: in a Hugging Face cache's `models--*` folder only `snapshots` (its `blobs`
    are the same files under hash names, `.no_exist` holds empty markers of files the Hub lacks)."""
    return [s for s in subfolders if s == "snapshots"] if folder.name.startswith("models--") else subfolders


def _model_file(path: Path) -> bool:
    """A regular file (not a link, but for a cache snapshot's link to its blob) that a walk or a glob takes for a
    model: by its bytes or by its name."""
    return ((stat.S_ISREG(path.lstat().st_mode) or cache_link(path))
            and (path.suffix.lower() in MODEL_SUFFIXES or looks_like_model(path)))


def _unique(items: list[str | Path]) -> list[str | Path]:
    """Each model once, by its real path (a URL by its text), in the order first named."""
    seen, out = set(), []
    for item in items:
        key = item if isinstance(item, str) else os.path.realpath(item)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out
