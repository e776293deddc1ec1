#!/usr/bin/env python
"""Draw a training run's loss and metric curves to a PNG: the same as `latentdiff plot`."""
import sys

from latentdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(command="plot"))
