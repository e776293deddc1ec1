#!/usr/bin/env python
"""Time our UNet against diffusers' with the same weights: the same as `latentdiff bench`."""
import sys

from latentdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(command="bench"))
