"""``python -m sdeflow ...``: the same command line as the ``sdeflow`` console script."""

from .cli import main

raise SystemExit(main())
