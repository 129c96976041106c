"""The BRAVO benchmark's input images (github.com/valeoai/bravo_challenge, README section 2 and
Appendix A1): ``<root>/bravo_<subset>/**/<name>.<png|jpg>``, labels hidden (scored by the
challenge's server), so ``--test_only --data BRAVO`` scores nothing and serves
``--export_bravo`` (``docs/bravo.md``)."""
from __future__ import annotations

from pathlib import Path

from obsnet.data.base import Pair, PairDataset
from obsnet.data.errors import DatasetError

SUBSETS = ("ACDC", "SMIYC", "outofcontext", "synflare", "synobjs", "synrain")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
EXPORT_SUFFIXES = ("_pred.png", "_conf.png")  # files of a submission, never inputs


def subset_images(folder: Path) -> list[Path]:
    """The input images under one ``bravo_<subset>`` folder, sorted (hidden files and
    submission files left out)."""
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not p.name.startswith(".") and not p.name.endswith(EXPORT_SUFFIXES))


class BRAVO(PairDataset):
    """Split ``all`` (every ``bravo_<subset>`` folder present) or one subset by name."""

    splits = ("all", *SUBSETS)
    check_splits = ()  # nothing labelled to check
    default_spec = "BRAVO"

    @classmethod
    def read_pairs(cls, root: Path, split: str,
                   problems: list[str] | None = None) -> tuple[Path, list[Pair]]:
        if split not in cls.splits:
            raise DatasetError(f"BRAVO: unknown split '{split}' (known: {', '.join(cls.splits)})")
        wanted = SUBSETS if split == "all" else (split,)
        folders = [root / f"bravo_{s}" for s in wanted if (root / f"bravo_{s}").is_dir()]
        if split != "all" and not folders:
            raise DatasetError(f"{root}: no folder bravo_{split}")
        images = [image for folder in folders for image in subset_images(folder)]
        if not images:
            raise DatasetError(f"{root}: no image under bravo_<subset>/ "
                               f"(subsets: {', '.join(SUBSETS)})")
        return root, [Pair(image, None, str(image)) for image in images]
