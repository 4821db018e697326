import sys

from nspo_trl.cli.plan import main

sys.exit(main(prog="python -m nspo_trl.planning"))
