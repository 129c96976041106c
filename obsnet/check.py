"""``python -m obsnet.check``: check a dataset folder before a long run. The command line;
the checks are ``obsnet.data.check``'s (its docstring lists what is reported)."""
import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from obsnet.data.check import check
from obsnet.data.loaders import DATASETS


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (argparse exits with 2 on usage errors)."""
    parser = argparse.ArgumentParser(prog="python -m obsnet.check",
                                     description="Check a dataset folder before a long run.")
    parser.add_argument("--data", required=True, choices=sorted(DATASETS), help="dataset name")
    parser.add_argument("--dset_folder", required=True, type=Path, help="dataset root folder")
    parser.add_argument("--splits", nargs="+",
                        help="splits to check (default: all known; the anomaly benchmarks: "
                             "their labelled split, --splits test for the test frames)")
    parser.add_argument("--workers", type=int, default=4, help="reading threads")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    lines, ok = check(args.data, args.dset_folder, args.splits, args.workers)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
