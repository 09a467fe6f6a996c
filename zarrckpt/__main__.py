"""``python -m zarrckpt``: the command line (see :mod:`zarrckpt.cli`)."""

from .cli import main

raise SystemExit(main())
