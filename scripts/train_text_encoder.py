#!/usr/bin/env python
"""Train the CLIP text encoder (stage 2): the same as `latentdiff train-text-encoder`."""
import sys

from latentdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(command="train-text-encoder"))
