"""Secret volumes on the process node, written the way the kubelet writes them.

The kubelet keeps each version of a volume's files in a directory of its own and swaps the
`..data` link to it in one rename; each key is a link through `..data`. A reader that resolves
`..data` first (as `kubeforge.tokens.read_dir` does) sees one version whole, even mid-update.
Processes on this node share one filesystem, so a volume lives in the pod's work directory and
the environment values that name a mount path are pointed there instead.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path


def write_atomic(directory: Path, data: Mapping[str, bytes]) -> None:
    """Make `directory` hold exactly `data`, switched over in one rename."""
    directory.mkdir(parents=True, exist_ok=True)
    version = directory / f"..{time.time_ns()}"
    version.mkdir()
    for key, value in data.items():
        (version / key).write_bytes(value)
    link = directory / "..data_tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(version.name)
    os.replace(link, directory / "..data")
    for key in data:
        if not (directory / key).is_symlink():
            (directory / key).symlink_to(f"..data/{key}")
    for entry in directory.iterdir():
        if entry.name.startswith("..") and entry.name not in ("..data", version.name):
            shutil.rmtree(entry, ignore_errors=True)
        elif not entry.name.startswith("..") and entry.name not in data:
            entry.unlink()


def remap(env: Mapping[str, str], mounts: Mapping[str, Path]) -> dict[str, str]:
    """`env` with every value that names a mount path (or a path below one) pointed at the
    directory that holds the volume here."""
    out = dict(env)
    for name, value in env.items():
        for mount, directory in mounts.items():
            if value == mount or value.startswith(mount.rstrip("/") + "/"):
                out[name] = str(directory) + value[len(mount.rstrip("/")) :]
    return out
