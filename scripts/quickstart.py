#!/usr/bin/env python
"""The same as `latentdiff quickstart`."""
import sys

from latentdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(command="quickstart"))
