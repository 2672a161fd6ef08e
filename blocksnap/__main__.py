"""Entry point for python -m blocksnap."""

from blocksnap.cli import main

raise SystemExit(main())
