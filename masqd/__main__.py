"""``python3 -m masqd ...``: the ``masqd`` command, for a Python that has masqd on its path."""

from masqd.cli import main

raise SystemExit(main())
