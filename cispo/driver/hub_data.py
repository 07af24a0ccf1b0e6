"""data.source=hub: a dataset by hub id, or a local directory laid out as the hub lays datasets out
(parquet / JSON(L) / arrow files, optionally one subdirectory per config, as in
``main/train-00000-of-00001.parquet``), or a directory written by ``save_to_disk`` (a Dataset or a
DatasetDict).

Splits: training draws from ``data.split`` (its first ``num_train`` rows); the held-out rows are the first
``num_eval`` of ``data.eval_split``, or, when that is empty, the last ``num_eval`` rows of ``data.split``
(at most a fifth of it, the rule of a jsonl/parquet file), which training then never sees.

Nothing is downloaded unless the id names no local directory: then `datasets` asks the hub (or its cache,
with HF_HUB_OFFLINE=1), and a failure is one config error naming data.path.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from cispo.core.config import DataConfig

# Holds configs/ (a link to <repo>/configs, or package data in a wheel) and assets/.
PACKAGE_DIR = Path(__file__).resolve().parents[1]
# What save_to_disk writes at the top of a DatasetDict's / a Dataset's directory.
SAVED_MARKERS = ("dataset_dict.json", "state.json")


def shipped_path(path: str) -> Path | None:
    """A relative path to something the package ships, found from any working directory: "configs/..."
    inside the package, "cispo/..." beside it (e.g. cispo/assets/datasets/gsm8k); None otherwise."""
    given = Path(path).expanduser()
    if given.is_absolute() or not given.parts:
        return None
    roots = {"configs": PACKAGE_DIR, "cispo": PACKAGE_DIR.parent}
    root = roots.get(given.parts[0])
    return root / given if root is not None and (root / given).exists() else None


def local_dir(path: str) -> Path | None:
    """data.path as a local directory (as given, or shipped with the package), or None for a hub id."""
    given = Path(path).expanduser()
    if given.is_dir():
        return given
    shipped = shipped_path(path)
    return shipped if shipped is not None and shipped.is_dir() else None


def held_out_rows(total: int, num_eval: int, split: str) -> range:
    """The rows of a split with no separate held-out split: the last min(num_eval, total // 5) are held
    out ("eval"), the rest are training's. A file's order is the user's, so the split is predictable."""
    n_eval = min(num_eval, total // 5)
    return range(total - n_eval, total) if split == "eval" else range(total - n_eval)


def _origin(cfg: DataConfig) -> str:
    return f"config error at data.path: {cfg.path!r}"


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).partition(chr(10))[0]}"


def _split_error(cfg: DataConfig, name: str, key: str, known: str) -> ValueError:
    fallback = (
        "; or leave data.eval_split empty to hold out the last rows of data.split"
        if key == "data.eval_split"
        else ""
    )
    return ValueError(f"config error at {key}: {cfg.path!r} has no split {name!r} ({known}){fallback}")


def _config_dir(cfg: DataConfig, root: Path) -> Path:
    """The directory of config data.name (a subdirectory, as the hub lays configs out), or root."""
    if not cfg.name:
        return root
    if (root / cfg.name).is_dir():
        return root / cfg.name
    configs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    raise ValueError(
        f"config error at data.name: {str(root)!r} has no config (subdirectory) {cfg.name!r}; "
        f"it has {configs or 'none'}"
    )


def _saved_split(cfg: DataConfig, directory: Path, name: str, key: str) -> datasets.Dataset:
    """One split of a save_to_disk directory; a single saved Dataset is the split data.split."""
    saved = datasets.load_from_disk(str(directory))
    if isinstance(saved, datasets.DatasetDict):
        if name not in saved:
            raise _split_error(cfg, name, key, f"it has {sorted(saved)}")
        return saved[name]
    if key == "data.eval_split":
        raise _split_error(cfg, name, key, "it was saved as one Dataset, with no splits")
    return saved


def _local_split(cfg: DataConfig, root: Path, name: str, key: str) -> datasets.Dataset:
    directory = _config_dir(cfg, root)
    if any((directory / marker).is_file() for marker in SAVED_MARKERS):
        return _saved_split(cfg, directory, name, key)
    try:
        return datasets.load_dataset(str(directory), split=name)
    except ValueError as err:
        if "Unknown split" in str(err):
            known = str(err).partition("Should be one of")[2].strip(" .") or "?"
            raise _split_error(cfg, name, key, f"it has {known}") from None
        raise ValueError(f"{_origin(cfg)}: {str(directory)!r} could not be read: {_first_line(err)}") from err
    except Exception as err:  # noqa: BLE001 - datasets' errors are long chains; one line names the path
        raise ValueError(f"{_origin(cfg)}: {str(directory)!r} could not be read: {_first_line(err)}") from err


def _hub_split(cfg: DataConfig, name: str, key: str) -> datasets.Dataset:
    """A split of a hub dataset: from the hub, or from its cache (HF_HUB_OFFLINE=1)."""
    try:
        return datasets.load_dataset(cfg.path, cfg.name or None, split=name)
    except ValueError as err:
        if "Unknown split" in str(err):
            raise _split_error(cfg, name, key, _first_line(err)) from None
        if "BuilderConfig" in str(err):
            raise ValueError(f"config error at data.name: {cfg.name!r}: {_first_line(err)}") from None
        raise ValueError(f"{_origin(cfg)}: {_first_line(err)}") from err
    except Exception as err:  # noqa: BLE001 - offline, unknown id, no access: all the same remedy
        raise ValueError(
            f"{_origin(cfg)} is no local directory (working directory {str(Path.cwd())!r}) and the hub "
            f"did not give it ({_first_line(err)}); point data.path at a local copy: a directory laid out "
            "as on the hub (data.name: its config subdirectory) or one written by save_to_disk"
        ) from None


def named_split(cfg: DataConfig, name: str, key: str) -> datasets.Dataset:
    """The split `name` of data.path (key: the config key that named it, for errors)."""
    given = Path(cfg.path).expanduser()
    if given.is_file():
        raise ValueError(
            f"{_origin(cfg)} is a file: data.source=hub reads a directory or a hub id; use "
            "data.source=jsonl or parquet for one file"
        )
    root = local_dir(cfg.path)
    return _hub_split(cfg, name, key) if root is None else _local_split(cfg, root, name, key)


def hub_rows(cfg: DataConfig, split: str) -> tuple[datasets.Dataset, list[int], str]:
    """The train or eval split's rows, their 1-based row numbers in the split they come from, and that
    split's name (for messages)."""
    if split == "eval" and cfg.eval_split:
        dataset, name = named_split(cfg, cfg.eval_split, "data.eval_split"), cfg.eval_split
        rows = range(min(cfg.num_eval, len(dataset)))
    else:
        dataset, name = named_split(cfg, cfg.split, "data.split"), cfg.split
        rows = held_out_rows(len(dataset), 0 if cfg.eval_split else cfg.num_eval, split)
        if split == "train":
            rows = rows[: cfg.num_train]
    selected = dataset.select(rows) if len(rows) else dataset.select([])  # an empty range is refused
    return selected, [r + 1 for r in rows], name
