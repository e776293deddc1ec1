#!/usr/bin/env python
"""Generate images from prompts: the same as `latentdiff generate`."""
import sys

from latentdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(command="generate"))
