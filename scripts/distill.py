#!/usr/bin/env python
"""Distil a trained UNet into a few-step student: the same as `latentdiff distill`."""
import sys

from latentdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(command="distill"))
