#!/usr/bin/env python3
"""Reproduce Ciresan, Meier, Gambardella & Schmidhuber (2010), "Deep, big, simple neural nets
excel on handwritten digit recognition". `python reproduce_2010.py --help` lists the flags."""
import sys

from gpumlp.cli import main

if __name__ == "__main__":
    sys.exit(main())
