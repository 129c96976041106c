"""``python -m obsnet``: the command line of ``python main.py``."""
import sys

from obsnet.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m obsnet"))
