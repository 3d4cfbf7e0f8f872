"""`python -m vdisk` is the `vdisk` command."""

from vdisk.cli import main

main()
