"""One syntax for user objects named in recipes and on the command line: ``module:attribute``.

The same form as Python entry points (``my_rewards:unsafe_penalty``, ``pkg.judges:classifier``).
The current working directory is importable, so a reward defined in ``./my_rewards.py`` is found
without installing it.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path


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
