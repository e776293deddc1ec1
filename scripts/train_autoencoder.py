#!/usr/bin/env python
"""Train the KL autoencoder (stage 1): the same as `latentdiff train-autoencoder`."""
import sys

from latentdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(command="train-autoencoder"))
