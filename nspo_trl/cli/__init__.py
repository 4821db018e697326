"""The ``nspo-trl`` command (``commands.py``), the training script (``train.py``), its arguments
(``arguments.py``), recipes (``recipe.py``) and the recipes and configs shipped in the package
(``packaged.py``)."""

from nspo_trl.cli.commands import main

__all__ = ["main"]
