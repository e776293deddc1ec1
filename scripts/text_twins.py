#!/usr/bin/env python
"""How often a text encoder's image tower prefers a picture's own caption to a twin one attribute away
(colours swapped, relation reversed, count, region, colour): does it read order and binding?"""
import sys

from latentdiff.eval.text_twins import main

if __name__ == "__main__":
    sys.exit(main())
