"""``python -m rankdown.cli`` (and ``torchrun -m rankdown.cli``): the ``rankdown`` command."""

import sys

from rankdown.cli import main

sys.exit(main())
