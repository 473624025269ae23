"""``python -m rankdown``: the ``rankdown`` command."""

import sys

from rankdown.cli import main

sys.exit(main())
