#!/usr/bin/env python
"""Audit the shapes judge on generated images: `make` the images and contact sheets, then `score` the
judge against a person's verdicts (the rules: --help, or latentdiff/eval/judge_audit.py)."""
import sys

from latentdiff.eval.judge_audit import main

if __name__ == "__main__":
    sys.exit(main())
