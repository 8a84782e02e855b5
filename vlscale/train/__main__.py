"""``python -m vlscale.train``: parse → build → train (see :mod:`vlscale.train.cli`)."""

from vlscale.train.cli import main

raise SystemExit(main())
