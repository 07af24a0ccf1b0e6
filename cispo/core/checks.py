"""Value checks shared by the config dataclasses (cispo.core.config) and the start-up checks."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any


def require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ValueError(f"config error at {key}: {message}")


def check_finite(key: str, value: Any) -> None:
    """The one non-finite check: `value` (a number, or a mapping / sequence of them, e.g. loss kwargs or
    reward kwargs) holds no inf or nan, else a config error naming the key (and the item inside it).
    Range checks such as `lr > 0` pass inf, and inf temperatures or learning rates fail far later."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        check_finite_fields(value, key)
    elif isinstance(value, (int, float)):
        require(math.isfinite(value), key, f"must be a finite number, got {value}")
    elif isinstance(value, Mapping):
        for name, item in value.items():
            check_finite(f"{key}.{name}", item)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_finite(f"{key}[{index}]", item)


def check_finite_fields(config: Any, prefix: str) -> None:
    """check_finite over every field of a config dataclass, nested ones (reward items, stages) included."""
    for item in dataclasses.fields(config):
        check_finite(f"{prefix}.{item.name}", getattr(config, item.name))
