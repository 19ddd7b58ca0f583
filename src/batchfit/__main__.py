"""``python -m batchfit`` (and ``torchrun -m batchfit``) run the command line."""

import sys

from batchfit.cli import main

sys.exit(main())
