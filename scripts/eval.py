#!/usr/bin/env python
"""The same as `latentdiff eval`."""
import sys

from latentdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(command="eval"))
