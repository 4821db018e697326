"""Small helpers of the command line and the package, one section each.

- Known third-party noise, silenced where it comes from: ``ignore_known_deprecations``,
  ``quiet_command_line``.
- The dependency versions nspo_trl is tested with: ``check_versions``.
- A free ``MASTER_PORT`` for command-line runs that no launcher started: ``free_master_port``.
- User objects named in recipes as ``module:attribute``: ``import_object``.
- Cache folders built once, atomically and under a file lock: ``cache_dir``, ``build_once``.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from filelock import FileLock
from packaging.specifiers import SpecifierSet
from packaging.version import Version

# ----------------------------------------------------------------------
# Known third-party noise, silenced where it comes from (and nothing else).
#
# - transformers 5 renamed ``gradient_checkpointing`` to ``activation_checkpointing`` and warns on every
#   use of the old names, which TRL 1.16's ``GRPOConfig`` and ``GRPOTrainer`` still use themselves: those
#   deprecation messages are ignored for the modules that emit them (``transformers.training_args``,
#   ``transformers.modeling_utils``), not FutureWarnings in general.
# - DeepSpeed, imported by accelerate/TRL on a machine without a GPU, warns that it fell back to the CPU;
#   on such a machine the command-line entry points tell it so up front (``DS_ACCELERATOR=cpu``), which is
#   the setting DeepSpeed documents, so it has nothing to warn about. A GPU machine is left untouched.

# (message, emitting module): the renamed field, and the renamed model methods
# (is_gradient_checkpointing, gradient_checkpointing_enable / _disable) TRL calls around generation
DEPRECATIONS = (
    (r"`gradient_checkpointing` is deprecated", r"transformers\.training_args"),
    (r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated", r"transformers\.modeling_utils"),
)


def ignore_known_deprecations() -> None:
    """Ignore exactly the deprecation warnings of ``DEPRECATIONS`` (message and emitting module)."""
    for message, module in DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning, module=module)


def quiet_command_line() -> None:
    """For ``nspo-trl`` / ``python -m nspo_trl.*``: the deprecations above, and DeepSpeed's CPU fallback."""
    ignore_known_deprecations()
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def plain_output_when_piped(training_args=None, stream=None) -> bool:
    """No progress bars when ``stream`` (default stderr) is not a terminal: a log file, a pipe, CI.

    A bar redrawn with carriage returns is debris in a file, so transformers' (loading, saving and, through
    ``training_args.disable_tqdm``, the trainer's: it then prints each log as one plain line), ``datasets``'
    and ``huggingface_hub``'s are switched off there; nspo_trl's own bars pass ``disable=None`` to tqdm, which
    makes the same check. Returns whether the output is plain.
    """
    stream = sys.stderr if stream is None else stream
    if stream.isatty():
        return False
    import datasets
    import huggingface_hub.utils
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()
    if training_args is not None:
        training_args.disable_tqdm = True
    return True


def progress_bar_disabled(progress: bool) -> bool | None:
    """tqdm's ``disable``: off when ``progress`` is False, else on only at a terminal (tqdm's ``None``)."""
    return None if progress else True


# ----------------------------------------------------------------------
# The dependency versions nspo_trl is tested with; anything else stops with a one-line error.

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


# ----------------------------------------------------------------------
# A free ``MASTER_PORT`` for command-line runs that no launcher started.
#
# accelerate sets up ``torch.distributed`` even for one process on a machine without a GPU (DeepSpeed's
# CPU accelerator), and then binds ``MASTER_PORT``, 29500 unless set. Two runs on one machine (two recipes,
# a run beside the tests) would then collide: ``DistNetworkError ... port: 29500 ... EADDRINUSE``. A
# process without ``WORLD_SIZE`` (not started by ``accelerate launch``/``torchrun``) therefore takes a free
# port through TRL's ``ensure_master_addr_port``; a port set by a launcher or by the user is kept.


def free_master_port() -> None:
    """Set ``MASTER_ADDR``/``MASTER_PORT`` to localhost and a free port unless a launcher or the user set them."""
    if "WORLD_SIZE" in os.environ:
        return
    from trl.trainer.utils import ensure_master_addr_port

    ensure_master_addr_port()


# ----------------------------------------------------------------------
# One syntax for user objects named in recipes and on the command line: ``module:attribute``.
#
# The same form as Python entry points (``my_rewards:unsafe_penalty``, ``pkg.judges:classifier``).
# The current working directory is importable, so a reward defined in ``./my_rewards.py`` is found
# without installing it.


def import_object(spec: str, field: str):
    """The object ``module:attribute`` names, or a one-line ``ValueError`` naming ``field`` and the fix."""
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        hint = f" (e.g. {spec.rpartition('.')[0]}:{spec.rpartition('.')[2]})" if "." in spec and not colon else ""
        raise ValueError(f"{field}: {spec!r} is not 'module:attribute'{hint}.")
    sys.path.insert(0, str(Path.cwd()))
    try:
        target = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{field}: cannot import {spec!r} ({err}).") from None
    finally:
        sys.path.pop(0)
    return target


# ----------------------------------------------------------------------
# Cache folders: built once, atomically, under a file lock per folder.


def cache_dir() -> Path:
    """``$NSPO_TRL_CACHE``, else ``$XDG_CACHE_HOME/nspo_trl``, else ``~/.cache/nspo_trl``."""
    if os.environ.get("NSPO_TRL_CACHE"):
        return Path(os.environ["NSPO_TRL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "nspo_trl"


def build_once(target: Path, build: Callable[[Path], None], is_built: Callable[[Path], bool]) -> Path:
    """``target``, built by ``build(staging)`` the first time: under a file lock per folder, so jobs started
    together wait for the first and reuse its folder instead of deleting it under a process already reading
    it; into a staging folder moved into place atomically, so a crash or an error leaves nothing half-written.
    """
    if is_built(target):
        return target
    locks = cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(locks / f"{target.name}.lock"):
        if is_built(target):
            return target
        staging = target.with_name(target.name + f".tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            build(staging)
            shutil.rmtree(target, ignore_errors=True)  # only a folder that is not built: never a finished one
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target
