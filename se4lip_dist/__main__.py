"""``python -m se4lip_dist`` = the ``se4lip-dist`` command."""

from se4lip_dist.cli import main

main()
