"""A folder of images -> triptychs and raw ObsNet maps (``obsnet.inference``):
``python inference.py --help``."""
import sys

from obsnet.inference import main

if __name__ == "__main__":
    sys.exit(main(prog="inference.py"))
