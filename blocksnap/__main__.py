"""Entry point for python -m blocksnap."""

import sys

try:
    from blocksnap.cli import main
except KeyboardInterrupt:  # Ctrl-C while the interpreter was still importing: nothing ran
    sys.stderr.write("blocksnap: error: interrupted; nothing was done\n")
    raise SystemExit(130) from None

raise SystemExit(main())
