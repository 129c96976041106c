"""``--export_scores DIR``: score maps in the layout of the SegmentMeIfYouCan evaluator.

The official code (github.com/SegmentMeIfYouCan/road-anomaly-benchmark,
``road_anomaly_benchmark/evaluation.py``) reads ``$DIR_OUTPUTS/anomaly_p/<method>/<dset>/<fid>.hdf5``:
an HDF5 dataset ``value`` (it saves ``float16``, gzip level 9), H×W at the frame's resolution.
``<dset>`` is the name a frame is stored under (``name_for_persistence`` in its
``datasets/``): ``AnomalyTrack-all`` for every AnomalyTrack split, ``ObstacleTrack-all`` for
every ObstacleTrack split, and for Fishyscapes Lost & Found (``FishyLAFAnomaly-val``) the
LostAndFound split its image comes from, ``LostAndFound-train`` or ``LostAndFound-test``.
``<fid>`` is the image's stem (``validation0001``), for LostAndFound without
``_leftImg8bit``.

Each frame's maps, computed at ``--size``, are resized to the frame's label resolution (its
image's for the test frames, whose labels are hidden) with the bilinear resize the evaluation
uses (``obsnet.data.native``), so the files give back the pixel metrics of the run's
``results_<split>.json`` up to float16's rounding. During the pass they wait as float32 files
in a temporary folder under DIR (``ScoreExport``: ``DIR/.anomaly_p.PID.XXXXXXXX.tmp``,
``outputs.temp_folder``), removed at the end (also after an error or a stop signal; one that a
killed run left is removed by the next export into DIR). float16 holds at most 65504: when a
method's finite scores exceed that in magnitude anywhere in the split (raw Mahalanobis
distances, energies), all of its maps of the split go through ``sign(x)·log1p(|x|)``, which
keeps the order of the scores (the evaluator only ranks them); the mapping is recorded in each
file (attribute ``mapping`` of ``value``) and in ``mapping.txt`` beside the files.
"""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from obsnet.errors import UsageError
from obsnet.models.blocks import resize
from obsnet.outputs import OutputError, atomic_write, temp_folder

FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
IDENTITY, LOG1P = "identity", "sign(x)*log1p(|x|)"
LAF_SUFFIX = "_leftImg8bit"
TRACK_DSETS = {"RoadAnomaly21": "AnomalyTrack-all", "RoadObstacle21": "ObstacleTrack-all"}
EXPORTABLE = (*TRACK_DSETS, "FishyscapesLAF")


def frame_target(spec_name: str, image: Path) -> tuple[str, str]:
    """(evaluator dataset name, frame id) of the frame whose image is ``image``."""
    image = Path(image)
    if spec_name in TRACK_DSETS:
        return TRACK_DSETS[spec_name], image.stem
    # .../leftImg8bit/<train|test>/<NN>_<scene>/<fid>_leftImg8bit.<ext>
    split = image.parent.parent.name
    fid = image.stem[:-len(LAF_SUFFIX)] if image.stem.endswith(LAF_SUFFIX) else image.stem
    return f"LostAndFound-{split}", fid


def score_path(root: Path, method: str, dset: str, fid: str) -> Path:
    return Path(root) / "anomaly_p" / method / dset / f"{fid}.hdf5"


def check_export_data(spec_name: str) -> None:
    """UsageError unless ``spec_name`` is a preset the official evaluator reads."""
    if spec_name not in EXPORTABLE:
        raise UsageError(f"--export_scores writes the SegmentMeIfYouCan evaluator's files: use it "
                         f"with --data {', '.join(EXPORTABLE)} (got {spec_name})")
    try:
        import h5py  # noqa: F401  (the [export] extra)
    except ImportError:
        raise UsageError("--export_scores needs h5py: pip install h5py (or the [export] "
                         "extra)") from None


def planned_files(root, spec_name: str, names, pairs) -> list[Path]:
    """Every file the export of ``names`` over ``pairs`` writes (score maps, mapping.txt)."""
    targets = [frame_target(spec_name, p.image) for p in pairs]
    files = [score_path(root, m, d, f) for m in names for d, f in targets]
    files += sorted({score_path(root, m, d, "x").with_name("mapping.txt")
                     for m in names for d, _ in targets})
    return files


def check_export_targets(root, spec_name: str, names, pairs, overwrite: bool) -> None:
    """UsageError, before any work, when files of an earlier export would be replaced."""
    existing = [p for p in planned_files(root, spec_name, names, pairs) if p.exists()]
    if existing and not overwrite:
        raise UsageError(f"--export_scores {root}: {len(existing)} file(s) of an earlier export "
                         f"are there (e.g. {existing[0]}); add --overwrite to replace them")


def finite_peak(score: np.ndarray) -> float:
    """The largest finite |score| (0 when none is finite)."""
    finite = np.abs(score[np.isfinite(score)])
    return float(finite.max()) if finite.size else 0.0


def choose_mapping(maps) -> str:
    """``LOG1P`` when some finite score of ``maps`` exceeds float16's range, else ``IDENTITY``."""
    return LOG1P if max((finite_peak(m) for m in maps), default=0.0) > FLOAT16_MAX else IDENTITY


def apply_mapping(score: np.ndarray, mapping: str) -> np.ndarray:
    """``score`` as float16 through ``mapping`` (order-preserving)."""
    score = np.asarray(score, np.float32)
    if mapping == LOG1P:
        score = np.sign(score) * np.log1p(np.abs(score))
    return score.astype(np.float16)


def write_score_map(path, score: np.ndarray, mapping: str = IDENTITY) -> None:
    """Write ``value`` (float16 H×W, gzip) into ``path`` atomically (built in memory, then
    ``obsnet.outputs.atomic_write``: a temporary file in the same folder, renamed)."""
    import h5py  # the [export] extra

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        value = f.create_dataset("value", data=apply_mapping(score, mapping),
                                 compression="gzip", compression_opts=9)
        value.attrs["mapping"] = mapping
    atomic_write(path, lambda sink: sink.write(buffer.getvalue()), "--export_scores")


def check_mapping_agrees(root, method: str, targets, mapping: str) -> None:
    """UsageError when a folder of this export holds other frames of an earlier export whose
    ``mapping.txt`` names another mapping than ``mapping``."""
    ours = {score_path(root, method, d, f) for d, f in targets}
    for dset in sorted({d for d, _ in targets}):
        note = score_path(root, method, dset, "x").with_name("mapping.txt")
        if not note.is_file():
            continue
        earlier = note.read_text().split("\n")[0]
        others = [p for p in note.parent.glob("*.hdf5") if p not in ours]
        if earlier != mapping and others:
            raise UsageError(f"--export_scores {root}: {note.parent} holds {len(others)} frame(s) "
                             f"of an earlier export written with {earlier}, these scores need "
                             f"{mapping}; export into another folder")


def frame_size(pair) -> tuple[int, int]:
    """(H, W) a frame's scores are written at: its label file's, or its image's when the
    labels are hidden."""
    with Image.open(pair.label if pair.label is not None else pair.image) as im:
        return im.height, im.width


def save_temporary(path: Path, score: np.ndarray) -> None:
    """``score`` as a ``.npy`` file, through Python's own writes: an OSError then says why
    (``No space left on device``), where numpy's direct write only counts the bytes."""
    buffer = io.BytesIO()
    np.save(buffer, score)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())


class ScoreExport:
    """``--export_scores`` of one evaluation pass. ``add`` stores each frame's maps (at
    ``--size``, float32) as ``.npy`` files in a temporary folder of its own under ``root``, so
    that a long split costs disk, not memory; ``finish`` resizes them to each frame's
    resolution (bilinear, as the evaluation does), chooses each method's mapping over the whole
    split and writes the HDF5 files; ``discard`` removes the temporary folder (and only it).

    A temporary write that fails (a full disk) does not stop the pass: the temporary folder
    is removed at once, the rest of the pass stores nothing, and ``finish`` raises the
    ``OutputError`` naming the file and the cause, after the table and results are out."""

    def __init__(self, root, spec_name: str, names, pairs):
        self.root, self.spec_name, self.pairs = Path(root), spec_name, list(pairs)
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_folder(self.root / "anomaly_p")  # those of killed runs removed first
        self.count = dict.fromkeys(names, 0)
        self.peak = dict.fromkeys(names, 0.0)  # largest finite |score| (bilinear keeps it a bound)
        self.failure: OutputError | None = None

    def add(self, name: str, maps: torch.Tensor) -> None:
        """The B×h×w score maps of the next frames (loader order) for method ``name``."""
        if self.failure is not None:
            return
        for score in maps.detach().float().cpu().numpy():
            path = self.tmp / f"{name}-{self.count[name]:06d}.npy"
            try:
                save_temporary(path, score)
            except OSError as exc:
                self.failure = OutputError(
                    f"--export_scores {path}: cannot be written ({exc.strerror or exc}); no score "
                    f"map exported, the temporary folder {self.tmp.name} removed")
                self.discard()  # its space, back for the results files
                return
            self.count[name] += 1
            self.peak[name] = max(self.peak[name], finite_peak(score))

    def finish(self) -> list[Path]:
        """Write every method's files; returns them. A folder where an earlier export wrote
        other frames with another mapping is a UsageError before any file is written (the
        evaluator ranks the pooled scores of all its frames); a failed temporary write is the
        OutputError ``add`` kept."""
        if self.failure is not None:
            raise self.failure
        sizes = [frame_size(p) for p in self.pairs]
        targets = [frame_target(self.spec_name, p.image) for p in self.pairs]
        mappings = {m: choose_mapping([np.float32(p)]) for m, p in self.peak.items()}
        for method, count in self.count.items():
            if count != len(self.pairs):
                raise RuntimeError(f"--export_scores: {count} maps for {len(self.pairs)} frames")
            check_mapping_agrees(self.root, method, targets, mappings[method])
        written = []
        for method, mapping in mappings.items():
            for i, ((dset, fid), size) in enumerate(zip(targets, sizes)):
                score = torch.from_numpy(np.load(self.tmp / f"{method}-{i:06d}.npy"))
                path = score_path(self.root, method, dset, fid)
                write_score_map(path, resize(score[None, None], size)[0, 0].numpy(), mapping)
                written.append(path)
            for dset in sorted({d for d, _ in targets}):
                written.append(self._write_note(method, dset, mapping))
        return written

    def _write_note(self, method: str, dset: str, mapping: str) -> Path:
        note = score_path(self.root, method, dset, "x").with_name("mapping.txt")
        text = f"{mapping}\n" + ("" if mapping == IDENTITY else
                                 "scores exceeded float16's range: value = sign(x)*log1p(|x|) "
                                 "of the raw score x (order-preserving)\n")
        atomic_write(note, lambda sink: sink.write(text.encode()), "--export_scores")
        return note

    def discard(self) -> None:
        """Remove the temporary folder this export created (nothing else)."""
        shutil.rmtree(self.tmp, ignore_errors=True)
