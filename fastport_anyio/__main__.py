"""``python -m fastport_anyio``: the ``fastport`` command, for environments without the console script."""

import sys

from .cli import main

sys.exit(main())
