"""The dependency versions nspo_trl is tested with; anything else stops with a one-line error."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from packaging.specifiers import SpecifierSet
from packaging.version import Version

TESTED = {
    "trl": SpecifierSet(">=1.16,<1.17"),
    "transformers": SpecifierSet(">=5.5.4,<6"),
    "deepspeed": SpecifierSet(">=0.18.6,<0.20"),
}


def installed(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def check_versions(packages: tuple[str, ...] = ("trl", "transformers")) -> None:
    """Raise ``ValueError`` naming the package and the tested range if an installed version is outside it."""
    for package in packages:
        found = installed(package)
        if found is not None and Version(found) not in TESTED[package]:
            raise ValueError(
                f"{package} {found} is not supported; nspo_trl is tested with {package}{TESTED[package]} "
                f"(pip install '{package}{TESTED[package]}')."
            )
