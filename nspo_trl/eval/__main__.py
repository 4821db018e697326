import sys

from nspo_trl.eval.cli import cli

sys.exit(cli())
