"""``python -m nsa.bench``: see :func:`nsa.bench.cli_main`."""

from . import cli_main

raise SystemExit(cli_main())
