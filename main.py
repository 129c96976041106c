"""ObsNet command line (``obsnet.cli``): ``python main.py --help``; no argument runs the demo."""
import sys

from obsnet.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="main.py"))
