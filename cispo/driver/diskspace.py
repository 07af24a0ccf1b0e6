"""Which device a path is on, for errors about a full disk: "no space left" alone does not say which of a
machine's mounts (the run dir, /tmp, a cache) filled up."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes (\\040 ...)."""
    return field.encode().decode("unicode_escape") if "\\" in field else field


def mount_of(path: str | os.PathLike[str]) -> tuple[str, str]:
    """(mount point, device or filesystem source) that holds `path`, or its nearest existing parent."""
    target = Path(path).resolve()
    while not target.exists() and target != target.parent:
        target = target.parent
    best = (str(Path(target.anchor or "/")), "?")
    try:
        lines = MOUNTINFO.read_text().splitlines()
    except OSError:
        return best
    depth = -1
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, source = left.split(), right.split()
        point = Path(_unescape(fields[4]))
        if (target == point or point in target.parents) and len(point.parts) >= depth:
            depth = len(point.parts)
            best = (str(point), _unescape(source[1]) if len(source) > 1 else "?")
    return best


def describe_device(path: str | os.PathLike[str]) -> str:
    """'<mount point> (<device>, <free> bytes free)' for the filesystem holding `path`."""
    point, device = mount_of(path)
    try:
        free = f"{shutil.disk_usage(point).free:,} bytes free"
    except OSError:
        free = "free space unknown"
    return f"{point} ({device}, {free})"


def is_disk_full(err: BaseException) -> bool:
    """Whether `err` (or what caused it) is a full disk or an exceeded quota."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(err):  # torch.save wraps the OSError in a RuntimeError
            return True
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return False


def disk_full_note(path: str | os.PathLike[str], err: BaseException) -> str:
    """A sentence naming the full device when `err` is a full disk, else an empty string."""
    if not is_disk_full(err):
        return ""
    return f"the device is full: {describe_device(path)}"
