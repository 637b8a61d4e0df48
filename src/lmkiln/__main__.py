"""`python -m lmkiln` (and `torchrun -m lmkiln`) run the CLI."""

import sys

from lmkiln.cli import main

sys.exit(main())
