#!/usr/bin/env python
"""Write a folder of captioned images as WebDataset tar shards: the same as `latentdiff pack`."""
import sys

from latentdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(command="pack"))
