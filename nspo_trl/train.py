"""``python -m nspo_trl.train RECIPE`` and ``accelerate launch -m nspo_trl.train RECIPE``.

The script itself is :mod:`nspo_trl.cli.train`; this module keeps the launch command short.
"""

import sys

from nspo_trl.cli.train import cli

if __name__ == "__main__":
    sys.exit(cli())
