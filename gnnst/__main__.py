"""``python -m gnnst <command>``."""

from gnnst.cli import run_and_exit

run_and_exit()
