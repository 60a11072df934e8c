"""`python -m gpumlp`: the command of reproduce_2010.py, wherever gpumlp is installed."""
import sys

from gpumlp.cli import main

if __name__ == "__main__":
    sys.exit(main())
