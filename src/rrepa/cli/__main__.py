"""python -m rrepa.cli: the `rrepa` command."""

from rrepa.cli import main

main()
