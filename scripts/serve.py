#!/usr/bin/env python
"""A local web page to generate, compare and keep images: the same as `latentdiff serve`."""
import sys

from latentdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(command="serve"))
