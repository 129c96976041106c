"""``python -m obsnet.paste``: write a pasted OOD split. The command line; the pasting itself
is ``obsnet.data.paste`` (its docstring describes the outputs and what is refused)."""
import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from obsnet.data.paste import DEFAULT_SUFFIX, MASK_SUFFIX, PROG, PasteConfig, paste_split
from obsnet.errors import UsageError
from obsnet.exit_codes import run_friendly


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (a UsageError for ``run_friendly``)."""

    def error(self, message: str):
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    """The command-line options."""
    p = _Parser(prog=PROG, description="Paste unseen objects into a CamVid-layout split.")
    p.add_argument("--root", required=True, type=Path, help="dataset root (CamVid layout)")
    p.add_argument("--split", required=True, help="split to paste into, e.g. val (root/val.txt)")
    p.add_argument("--out", type=Path, help="root to write to (default: --root)")
    p.add_argument("--suffix", default=DEFAULT_SUFFIX,
                   help="name of the new split: {split}_SUFFIX (default ood; e.g. ood_real)")
    p.add_argument("--objects", type=Path, help="folder of cut-outs: RGBA name.png, or name.png "
                   f"+ name{MASK_SUFFIX}.png (default: procedural shapes)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--count", type=int, nargs=2, default=(1, 1), metavar=("MIN", "MAX"),
                   help="objects per frame (default 1 1)")
    p.add_argument("--size", type=float, nargs=2, default=(0.1, 0.3), metavar=("MIN", "MAX"),
                   help="object size, fraction of the shorter image side (default 0.1 0.3)")
    p.add_argument("--anomaly_id", type=int, default=12, help="label id of pasted pixels (12)")
    p.add_argument("--feather", type=float, default=1.0,
                   help="soften the image edge inwards by this many pixels (0: hard; default 1)")
    p.add_argument("--allow_existing_id", action="store_true",
                   help="warn instead of refusing when a label already holds the anomaly id")
    p.add_argument("--overwrite", action="store_true",
                   help="replace this tool's own previous output (never anything else)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 usage error, 1 bad data or existing output)."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def run(argv: list[str]) -> int:
        args = _parser().parse_args(argv)
        config = PasteConfig(seed=args.seed, count=tuple(args.count), size=tuple(args.size),
                             anomaly_id=args.anomaly_id, feather=args.feather)
        list_file = paste_split(args.root, args.split, config, args.out, args.objects,
                                args.overwrite, args.allow_existing_id, suffix=args.suffix)
        print(f"{PROG}: wrote {list_file}")
        return 0

    return run_friendly(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
