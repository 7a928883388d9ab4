"""`python -m patchscan.cli.main ...` is the `patchscan` command."""

from patchscan.cli.main import main

main()
