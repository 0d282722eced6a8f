"""`python -m ablate.cli` runs the CLI (as the `ablate` command does)."""

import sys

from ablate.cli import main

sys.exit(main())
