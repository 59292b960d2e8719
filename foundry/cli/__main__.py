"""`python -m foundry.cli ...`, the same as `python -m foundry ...` and the `foundry` script."""

import sys

from foundry.cli.main import main

sys.exit(main())
