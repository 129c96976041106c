"""``python -m obsnet.synthetic``: write the synthetic road-scene dataset in the CamVid layout.
The command line; the dataset is ``obsnet.data.synthetic``'s."""
import argparse
import time
from pathlib import Path

from obsnet.data.errors import DatasetError
from obsnet.data.synthetic import DEFAULT_COUNTS, SPEC, generate


def main(argv=None) -> None:
    """CLI entry point: generate the dataset; a folder it did not write is one line, exit 1."""
    parser = argparse.ArgumentParser(prog="python -m obsnet.synthetic",
                                     description="Write the synthetic road-scene dataset.")
    parser.add_argument("--out", required=True, type=Path, help="dataset root to write")
    parser.add_argument("--seed", type=int, default=0)
    for split, n in DEFAULT_COUNTS.items():
        parser.add_argument(f"--n_{split}", type=int, default=n, help=f"{split} images")
    parser.add_argument("--size", type=int, nargs=2, default=list(SPEC.size),
                        metavar=("H", "W"))
    parser.add_argument("--overwrite", action="store_true",
                        help="regenerate even if complete (only a folder it generated)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        generate(args.out, args.seed, args.n_train, args.n_val, args.n_test, tuple(args.size),
                 overwrite=args.overwrite, progress=True)
    except DatasetError as exc:
        raise SystemExit(f"python -m obsnet.synthetic: error: {exc}") from None
    print(f"{args.out}: done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
