import sys

from nspo_trl.cli.eval import cli

sys.exit(cli())
