"""The files a stage of main.py writes into its --tboard folder, and the record of them.

Each stage writes files of its own, so that stages sharing a folder (the README's training and
test commands share one --tboard) never replace each other's: ``config_<stage>.json``, with
stage ``train_segnet``, ``train_obsnet``, ``fit_stats`` or ``test_<split>``, and a test's
``results_<split>.json``, ``results_<split>.csv`` and ``reliability_<split>.png`` (split: the
evaluated one). TensorBoard's
event files have unique names already.

Every such file is listed in the folder's manifest (``MANIFEST``, ``ownership.write_listing``)
before it is written, so a later run tells the files of an earlier run of ours from a user's:
a file of these names that the manifest does not list is never replaced, even with
--overwrite; one it lists only with --overwrite (a training stage: --overwrite or --resume).
The manifest is written atomically by the run holding the folder's lock. A run that stops
before its stage has any output on disk withdraws its config (``RunFiles.withdraw``), so that
fixing a flag and running again never needs --overwrite.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from obsnet.errors import UsageError
from obsnet.ownership import exists, listed_files, unlisted, write_listing

MANIFEST = ".obsnet-written.json"
WRITER = "main.py"


def stage_name(train_segnet: bool, fit_stats: bool, test_split: str | None) -> str:
    """``train_segnet``, ``fit_stats``, ``test_<split>`` (``test_split`` given: a test run) or
    ``train_obsnet``."""
    if fit_stats:
        return "fit_stats"
    if test_split is not None:
        return f"test_{file_part(test_split)}"
    return "train_segnet" if train_segnet else "train_obsnet"


def file_part(text: str) -> str:
    """``text`` as a piece of a file name: characters other than letters, digits, ``.``,
    ``_`` and ``-`` become ``_`` (a split named ``a/b`` must not reach another folder)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text) or "_"


@dataclass(frozen=True)
class RunFiles:
    """The files one stage writes into ``folder`` (named by ``flag``): its config and, for a
    test (``split`` given), its results."""

    folder: Path
    stage: str
    split: str | None = None
    flag: str = "--tboard"

    @property
    def config(self) -> Path:
        """``config_<stage>.json``: the run's resolved flags."""
        return self.folder / f"config_{self.stage}.json"

    @property
    def results_json(self) -> Path:
        """``results_<split>.json`` (a test stage only)."""
        return self.folder / f"results_{file_part(self.split)}.json"

    @property
    def results_csv(self) -> Path:
        """``results_<split>.csv`` (a test stage only)."""
        return self.folder / f"results_{file_part(self.split)}.csv"

    @property
    def risk_coverage_png(self) -> Path:
        """``risk_coverage_<split>.png`` (a test stage only): every method's curve."""
        return self.folder / f"risk_coverage_{file_part(self.split)}.png"

    @property
    def reliability_png(self) -> Path:
        """``reliability_<split>.png``: the reliability diagrams (a test stage only)."""
        return self.folder / f"reliability_{file_part(self.split)}.png"

    @property
    def planned(self) -> list[Path]:
        """Every file this stage may write here."""
        results = [self.results_json, self.results_csv, self.risk_coverage_png,
                   self.reliability_png] \
            if self.split is not None else []
        return [self.config, *results]

    @property
    def manifest(self) -> Path:
        return self.folder / MANIFEST

    def listed(self) -> set[str]:
        """The names the manifest lists (none when it is missing or unreadable: then nothing
        here counts as ours)."""
        return set(listed_files(self.manifest) or [])

    def check(self, replace: bool, resume: bool = False) -> None:
        """UsageError, before any work, when a planned file exists and was not written by
        main.py (always), or was written by an earlier run and ``replace`` is false (the hint
        names --overwrite, and --resume too when ``resume``: a training stage)."""
        names = [p.name for p in self.planned]
        foreign = unlisted(self.folder, names, self.listed())
        if foreign:
            raise UsageError(f"{self.flag} {self.folder}: {foreign[0]} is there and was not "
                             f"written by {WRITER} (not listed in {MANIFEST}); it is never "
                             f"replaced: move it away or choose another {self.flag}")
        existing = [name for name in names if exists(self.folder / name)]
        if existing and not replace:
            one = len(existing) == 1
            also = " (or --resume to continue that run)" if resume else ""
            raise UsageError(f"{self.flag} {self.folder}: {', '.join(existing)} of an earlier run "
                             f"{'is' if one else 'are'} there; add --overwrite to replace "
                             f"{'it' if one else 'them'}{also}")

    def claim(self, path: Path) -> Path:
        """List ``path`` (one of ``planned``) in the manifest, then return it to be written:
        listed first, so that a run stopped between the two never leaves a file of ours that
        a later run would take for a user's."""
        listed = self.listed()
        if path.name not in listed:
            write_listing(self.manifest, listed | {path.name}, self.flag, written_by=WRITER)
        return path

    def withdraw(self, path: Path) -> None:
        """Remove ``path``, written by this run, and its name from the manifest (best effort:
        it runs while an error or a signal is on its way to the user)."""
        try:
            path.unlink(missing_ok=True)
            listed = self.listed()
            if path.name in listed:
                write_listing(self.manifest, listed - {path.name}, self.flag, written_by=WRITER)
        except OSError:
            pass
