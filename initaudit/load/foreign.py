"""Objects a training checkpoint pickles beside its weights whose classes initaudit does not import (OmegaConf
configs, argparse namespaces, dataclasses, enums, numpy scalars in the hyper-parameters): each is read as an inert
placeholder. A placeholder class stands for one global the pickle names; the module is never imported and nothing
of it is ever called: "calling" a placeholder (REDUCE, NEWOBJ) makes a placeholder object that keeps the
arguments, and BUILD, APPENDS and SETITEMS keep the state and items it is given. That is the safety boundary.

A pickle that names a callable only code execution needs (a shell, an import, eval, a file) is still refused,
naming every such callable: a file like that is an attack, not a checkpoint."""

from __future__ import annotations

import _compat_pickle
import copyreg
import pickle
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from initaudit.common.errors import InputError

# The most placeholder objects one file may make (an OmegaConf config of 1,000 keys makes about 3,000), and the
# most classes it may name (each placeholder class takes about 1.6 kB).
MAX_FOREIGN_OBJECTS = 100_000
MAX_FOREIGN_CLASSES = 10_000
# Modules whose callables a pickle names only to run code, and such callables of other modules. Refusing them
# names the attack; it is not what keeps the user safe (a placeholder of any of them would be as inert as any).
CODE_EXECUTION_MODULES = ("os", "posix", "nt", "subprocess", "_posixsubprocess", "sys", "importlib", "runpy",
                          "shutil", "socket", "pickle", "_pickle", "marshal", "code", "codeop", "ctypes", "pty",
                          "multiprocessing", "signal", "webbrowser", "pdb", "bdb", "asyncio", "threading", "_thread",
                          "torch.hub", "torch.jit", "torch.serialization", "torch.package")
CODE_EXECUTION_CALLABLES = frozenset(
    [f"builtins.{name}" for name in ("eval", "exec", "compile", "__import__", "getattr", "setattr", "delattr", "open",
                                     "input", "breakpoint", "globals", "locals", "vars", "exit", "quit", "help")]
    + [f"{module}.{name}" for module in ("io", "_io") for name in ("open", "open_code", "FileIO")]
    + [f"types.{name}" for name in ("FunctionType", "LambdaType", "CodeType", "MethodType", "ModuleType")])
# The note names this many classes and counts the rest.
NOTE_NAMES = 5


def runs_code(module: str, name: str) -> bool:
    """Whether `module.name` is a callable only code execution needs."""
    return f"{module}.{name}" in CODE_EXECUTION_CALLABLES or any(
        module == m or module.startswith(m + ".") for m in CODE_EXECUTION_MODULES)


class PlaceholderType(type):
    """The class of placeholder classes (so that writing one back is refused rather than its module imported)."""


class Placeholder(metaclass=PlaceholderType):
    """An object of a class initaudit did not import: what the pickle built it with, kept as data."""

    __slots__ = ("args", "kwargs", "state", "items", "entries")
    foreign_name = ""          # the global the pickle named, "module.name"
    seen: Foreign | None = None

    def __new__(cls, *args, **kwargs):
        cls.seen.count(cls.foreign_name)
        obj = super().__new__(cls)
        for slot, value in zip(Placeholder.__slots__, (args, kwargs, None, [], [])):
            object.__setattr__(obj, slot, value)
        return obj

    def __init__(self, *args, **kwargs):
        """The arguments were kept by __new__; nothing else happens."""

    def __setstate__(self, state):
        object.__setattr__(self, "state", state)

    def __setattr__(self, name, value):
        raise AttributeError(f"a placeholder of {self.foreign_name} is read-only")

    def __delattr__(self, name):
        raise AttributeError(f"a placeholder of {self.foreign_name} is read-only")

    def append(self, item):
        self.items.append(item)

    def extend(self, items):
        self.items.extend(items)

    add = append  # ADDITEMS: a set-like class

    def __setitem__(self, key, value):
        self.entries.append((key, value))

    def __reduce_ex__(self, protocol):
        raise self.seen.not_writable()

    def __repr__(self):
        return f"<{self.foreign_name} read as a placeholder>"


def _refuse_writing_class(cls: PlaceholderType):
    """What pickle calls to write a placeholder class: it refuses (pickle's own way would import the module)."""
    raise cls.seen.not_writable()


copyreg.pickle(PlaceholderType, _refuse_writing_class)  # pickling a placeholder class never imports its module


class Foreign:
    """What one read met outside the allowlist: a placeholder class per global named, how many objects of each
    it made, and the callables refused."""

    def __init__(self, path: Path):
        self.path = path
        self.classes: dict[str, PlaceholderType] = {}  # in the order the pickle first names them
        self.objects: Counter[str] = Counter()
        self.made = 0
        self.refused: list[str] = []

    def placeholder(self, module: str, name: str) -> PlaceholderType:
        """The placeholder class for `module.name` (one per global, made without importing anything)."""
        full = f"{module}.{name}"
        if full not in self.classes:
            if len(self.classes) >= MAX_FOREIGN_CLASSES:
                raise self.too_many(f"names more than {MAX_FOREIGN_CLASSES:,} classes", "MAX_FOREIGN_CLASSES")
            if runs_code(module, name):
                self.refused.append(full)
            attrs = {"__slots__": (), "foreign_name": full, "seen": self, "__qualname__": name}
            self.classes[full] = PlaceholderType(name.rpartition(".")[2] or "placeholder", (Placeholder,), attrs)
        return self.classes[full]

    def count(self, full: str) -> None:
        self.objects[full] += 1
        self.made += 1
        if self.made > MAX_FOREIGN_OBJECTS:
            raise self.too_many(f"holds more than {MAX_FOREIGN_OBJECTS:,} objects of classes", "MAX_FOREIGN_OBJECTS")

    def too_many(self, what: str, bound: str) -> InputError:
        return InputError(f"{self.path}: {what} initaudit does not import "
                          f"(initaudit.load.foreign.{bound}): too many to read")

    def not_writable(self) -> InputError:
        return InputError(f"{self.path}: holds objects initaudit read as placeholders ({self.listing()}), and "
                          "cannot write them back; save the state_dict alone, or pass --trust-pickle if you trust "
                          "the file's source")

    def listing(self, objects: Counter[str] | None = None) -> str:
        """The classes of `objects` (else of all objects made; else all classes named), first named first, with
        how many objects of each: 'omegaconf.dictconfig.DictConfig (3), argparse.Namespace (1)'."""
        objects = self.objects if objects is None else objects
        shown = [n for n in self.classes if objects[n]] or list(self.classes)
        names = [f"{n} ({objects[n]})" if objects[n] else n for n in shown]
        more = f", and {len(names) - NOTE_NAMES} more" if len(names) > NOTE_NAMES else ""
        return ", ".join(names[:NOTE_NAMES]) + more

    def note(self, root: Any) -> str | None:
        """What the checkpoint holds outside its tensors that initaudit read as placeholders: the outermost
        objects by class (a DictConfig, not the nodes inside it)."""
        if not self.classes:
            return None
        outer = outermost(root)
        inside = len(self.classes) - len(outer)
        return ("the checkpoint holds objects of classes initaudit did not import, read as inert placeholders "
                f"(never imported, never run; only its tensors are audited): {self.listing(outer)}"
                + (f"; {inside} more classes inside them" if outer and inside else ""))


def outermost(root: Any) -> Counter[str]:
    """How many placeholders of each class `placeholders_in(root)` finds."""
    return Counter(obj.foreign_name for obj in placeholders_in(root))


def placeholders_in(root: Any) -> Iterator[Placeholder | PlaceholderType]:
    """The placeholders reachable from `root` through plain containers (dicts, lists, tuples, sets): the objects a
    reader of the checkpoint meets, not those inside them."""
    return (obj for obj in walk(root, into_placeholders=False) if is_placeholder(obj))


def walk(root: Any, into_placeholders: bool) -> Iterator[Any]:
    """`root` and every object in it, once each: through plain containers, and placeholders if asked."""
    stack, seen = [root], set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        yield obj
        if isinstance(obj, dict):
            stack.extend([*obj.keys(), *obj.values()])
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif into_placeholders and isinstance(obj, Placeholder):
            stack.extend([*obj.args, *obj.kwargs.values(), obj.state, *obj.items, *(x for e in obj.entries for x in e)])


def is_placeholder(obj: Any) -> bool:
    return isinstance(obj, (Placeholder, PlaceholderType))


def placeholder_pickle(foreign: Foreign, allowed: dict[str, Any]) -> type:
    """A `pickle_module` for torch.load: what `allowed` names (torch's weights-only allowlist) is built as itself,
    every other global as a placeholder of `foreign`."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            module, name = python3_name(module, name)
            found = allowed.get(f"{module}.{name}")
            return found if found is not None else foreign.placeholder(module, name)

    class PlaceholderPickle:
        @staticmethod
        def load(file, **kwargs):
            return Unpickler(file, **kwargs).load()

    PlaceholderPickle.Unpickler = Unpickler
    return PlaceholderPickle


def python3_name(module: str, name: str) -> tuple[str, str]:
    """A protocol-2 pickle's Python 2 names (`__builtin__.dict`) as Python 3 spells them, as pickle maps them."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name
