"""``python -m obsnet.check``: check a dataset folder (``obsnet.data.check``)."""
import sys

from obsnet.data.check import main

if __name__ == "__main__":
    sys.exit(main())
