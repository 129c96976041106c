"""``python -m obsnet.paste``: write a pasted OOD split (``obsnet.data.paste``)."""
import sys

from obsnet.data.paste import main

if __name__ == "__main__":
    sys.exit(main())
