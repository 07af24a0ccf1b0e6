"""One registry class for everything chosen by name: losses, advantages, learners, engines, rewards,
sandboxes.

A name resolves, in order, to
1. an entry registered in this process (``@LOSSES.register("cispo")``),
2. a built-in that is imported only when asked for (``lazy={"vllm": "rollout.vllm_engine:VLLMEngine"}``,
   so a missing optional dependency only matters to whoever selects it),
3. a ``package.module:attr`` path, imported where it is resolved: a DeepSpeed rank or a Ray worker that
   receives the same string finds the same object, which a name registered only in the driver would not;
   or a ``path/to/file.py:attr`` path, loaded from that file (the CLI makes such paths absolute, and puts
   the launch directory last on sys.path, so a module next to where you launch is found by name too;
   one named like an installed package, e.g. a ``rewards.py`` there, is refused by name and must be named
   by path: :mod:`cispo.core.launch`),
4. an entry point of the registry's group (``[project.entry-points."cispo.losses"]``), so other packages
   can ship plugins without touching this repository.

Duplicates: registering the same object again is harmless (re-imports, reloads of the defining module);
a different object under a taken name is an error naming both.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Generic, TypeVar

from cispo.core.launch import launch_dir, launch_dir_on_path, shadowed_file

T = TypeVar("T")


def _describe(obj: Any) -> str:
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return f"{module}.{name}" if module and name else repr(obj)


def _same(a: Any, b: Any) -> bool:
    # A module imported twice (a reload, or run as __main__ and imported) re-creates its top-level
    # functions and classes: the same definition, so the same plugin. Lambdas and closures
    # ("<lambda>", "f.<locals>.g") share a qualified name across different objects, so they never match.
    qualname = getattr(a, "__qualname__", None)
    return a is b or (
        qualname is not None
        and "<" not in qualname
        and getattr(a, "__module__", None) == getattr(b, "__module__", None)
        and qualname == getattr(b, "__qualname__", None)
    )


def is_file_path(name: str) -> bool:
    return name.partition(":")[0].endswith(".py")


def _import_file(file: str, kind: str, path: str) -> Any:
    """A plugin file as a module, once per absolute path (its name in sys.modules is derived from it)."""
    location = Path(file).expanduser().resolve()
    if not location.is_file():
        raise ValueError(f"{kind} {path!r}: no file {str(location)!r}")
    name = f"cispo_plugin_{location.stem}_{hashlib.sha1(str(location).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, location)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise ValueError(f"{kind} {path!r}: importing {str(location)!r} failed ({err!r})") from err
    return module


def _refuse_shadowed(module: Any, module_name: str, attr: str, kind: str, path: str) -> None:
    """A module of the user's named like an installed one (our ``rewards`` package, say) is never silently
    swapped for it: ValueError with the path form that loads the user's file."""
    mine = shadowed_file(module_name, module)
    if mine is None:
        return
    try:
        shown = f"./{mine.relative_to(launch_dir())}"
    except ValueError:
        shown = str(mine)
    raise ValueError(
        f"{kind} {path!r}: module {module_name!r} is {getattr(module, '__file__', module_name)}, not your "
        f"{str(mine)!r} (installed packages come first on the import path); name yours by path: "
        f"'{shown}:{attr}'"
    )


def import_path(path: str, kind: str = "object") -> Any:
    """The object at ``package.module:attr`` or ``path/to/file.py:attr`` (attr may be dotted); ValueError
    naming what is missing."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        forms = "'package.module:attr' or 'path/to/file.py:attr'"
        raise ValueError(f"{kind} path {path!r} must look like {forms}")
    if module_name.endswith(".py"):
        obj: Any = _import_file(module_name, kind, path)
    else:
        launch_dir_on_path()
        try:
            obj = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"{kind} {path!r}: cannot import module {module_name!r} ({err})") from err
        _refuse_shadowed(obj, module_name, attr, kind, path)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{kind} {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    """Named objects of one kind, with optional per-entry metadata (e.g. a reward's score range)."""

    def __init__(self, kind: str, group: str, lazy: dict[str, str] | None = None) -> None:
        self.kind, self.group = kind, group
        self._entries: dict[str, T] = {}
        self._metadata: dict[str, dict[str, Any]] = {}
        self._lazy = dict(lazy or {})

    def register(self, name: str, obj: T | None = None, **metadata: Any) -> Any:
        """``register(name, obj)``, or ``@register(name)`` as a decorator; returns the object."""

        def add(target: T) -> T:
            taken = self._entries.get(name)
            if taken is not None and not _same(taken, target):
                raise ValueError(
                    f"{self.kind} {name!r} is already registered as {_describe(taken)}; "
                    f"cannot register {_describe(target)} under the same name"
                )
            self._entries[name] = target
            if metadata or taken is None:  # a plain re-registration keeps the metadata it had
                self._metadata[name] = metadata
            return target

        return add if obj is None else add(obj)

    def add_lazy(self, name: str, path: str) -> None:
        """A built-in by ``package.module:attr``, imported only when first asked for."""
        self._lazy[name] = path

    def names(self) -> list[str]:
        return sorted(set(self._entries) | set(self._lazy))

    def __contains__(self, name: str) -> bool:
        return name in self._entries or name in self._lazy

    def metadata(self, name: str) -> dict[str, Any]:
        return dict(self._metadata.get(name, {}))

    def get(self, name: str) -> T:
        """The object named ``name`` (see the module docstring for the order); ValueError if none."""
        if name in self._entries:
            return self._entries[name]
        if name in self._lazy:
            obj = import_path(self._lazy[name], self.kind)
            # The module may have registered it under this name on import; if not, register it now.
            return self._entries[name] if name in self._entries else self.register(name, obj)
        if ":" in name:
            return import_path(name, self.kind)
        for ep in entry_points(group=self.group):
            if ep.name == name:
                return self.register(name, ep.load())
        raise ValueError(
            f"unknown {self.kind} {name!r}; registered: {', '.join(self.names()) or '(none)'}; "
            f"or give 'package.module:attr', or an entry point in group '{self.group}'"
        )

    def check(self, name: str) -> None:
        """Raises the same ValueError as get() would, without building anything."""
        self.get(name)


def callable_from(registry: Registry[Any], name: str) -> Callable[..., Any]:
    obj = registry.get(name)
    if not callable(obj):
        raise TypeError(f"{registry.kind} {name!r} resolves to {obj!r}, which is not callable")
    return obj
