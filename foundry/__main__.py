"""`python -m foundry ...` (and `torchrun -m foundry ...`) run the command line."""

import sys

from foundry.cli import main

sys.exit(main())
