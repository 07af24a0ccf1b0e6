"""The launch directory on the import path, without letting a user's file pass for one of our packages.

Plugins live next to where a run is launched (``reward.rewards=[{name: myrewards:fn}]``), so that directory
must be importable in every process of the run. Our top-level packages have generic names (``rewards``,
``rollout``, ``sandboxes``), and a user's ``rewards.py`` there must neither break the run nor be taken for
ours, nor ours for theirs:

- the launch directory goes at the end of ``sys.path`` (:func:`add_launch_dir`), and reaches child
  processes as ``$CISPO_LAUNCH_DIR``, not ``PYTHONPATH`` (which Python puts first); the registry appends it
  again wherever it imports a plugin module (:func:`launch_dir_on_path`);
- our packages are pinned (:func:`pin_own_packages`): a finder ahead of every ``sys.path`` entry resolves
  their names to our own directories. Importing this module pins them, so it runs first wherever ours are
  imported before our code runs: the reward workers' fork server preloads it, and Ray workers run
  :func:`pin_own_packages` as their ``worker_process_setup_hook`` (Ray puts the driver's working directory
  first on their ``sys.path``). An editable install's finder comes after every ``sys.path`` entry, so
  without the pin even a launch directory last on the path would win;
- a plugin named by module (``rewards:fn``) that imports some other file than the launch directory's
  ``rewards.py`` is refused with the path form to use instead (:func:`shadowed_file`).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

LAUNCH_DIR_ENV = "CISPO_LAUNCH_DIR"
OWN_PACKAGES = ("cispo", "rewards", "rollout", "sandboxes")
ROOT = Path(__file__).resolve().parents[2]  # the directory holding our top-level packages
RAY_SETUP_HOOK = "cispo.core.launch.pin_own_packages"  # Ray's form: module.function


class _OwnPackages(importlib.abc.MetaPathFinder):
    """Finds our top-level packages in ROOT before any sys.path entry can offer a file of the same name."""

    def find_spec(
        self, name: str, path: object = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if path is not None or name not in OWN_PACKAGES:
            return None  # a submodule: found through its (pinned) package's __path__
        init = ROOT / name / "__init__.py"
        if not init.is_file():
            return None
        return importlib.util.spec_from_file_location(
            name, init, submodule_search_locations=[str(init.parent)]
        )


def pin_own_packages() -> None:
    """Our package names resolve to our packages in this process, whatever comes first on sys.path."""
    if not any(isinstance(finder, _OwnPackages) for finder in sys.meta_path):
        sys.meta_path.insert(0, _OwnPackages())


def add_launch_dir(directory: str | None = None) -> str:
    """Puts ``directory`` (default: the working directory) last on sys.path, moving it (and ``python -m``'s
    "" entry) from the front, and records it for child processes; returns its absolute path."""
    where = os.path.abspath(directory or os.getcwd())
    sys.path[:] = [p for p in sys.path if p not in ("", where)] + [where]
    os.environ[LAUNCH_DIR_ENV] = where
    pin_own_packages()
    return where


def launch_dir() -> Path:
    """The directory the run was launched from ($CISPO_LAUNCH_DIR), else the working directory."""
    return Path(os.environ.get(LAUNCH_DIR_ENV) or os.getcwd()).resolve()


def launch_dir_on_path() -> None:
    """In a child process of a run: the launch directory, last on sys.path, as in the driver."""
    where = os.environ.get(LAUNCH_DIR_ENV)
    if where and where not in sys.path:
        sys.path.append(where)


def shadowed_file(module_name: str, module: ModuleType) -> Path | None:
    """The launch directory's own file for ``module_name`` when ``module`` (what importing it gave) is some
    other file, e.g. our ``rewards`` package while the user meant their ``rewards.py``; else None."""
    base = launch_dir().joinpath(*module_name.split("."))
    candidates = [base.with_name(base.name + ".py"), base / "__init__.py"]
    mine = next((c for c in candidates if c.is_file()), None)
    loaded = getattr(module, "__file__", None)
    if mine is None or (loaded is not None and Path(loaded).resolve() == mine.resolve()):
        return None
    return mine


pin_own_packages()  # on import: see the module docstring
