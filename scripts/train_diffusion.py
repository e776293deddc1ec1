#!/usr/bin/env python
"""Train the text-conditioned UNet (stage 3): the same as `latentdiff train-diffusion`."""
import sys

from latentdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(command="train-diffusion"))
