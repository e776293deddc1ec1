"""`python -m latentdiff` is the `latentdiff` command (and what `accelerate launch -m latentdiff` runs)."""
import sys

from .cli import main

sys.exit(main())
