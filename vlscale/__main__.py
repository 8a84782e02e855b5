"""``python -m vlscale``: the ``vlscale`` command (see :mod:`vlscale.cli`)."""

from vlscale.cli import main

raise SystemExit(main())
