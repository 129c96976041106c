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

The maps written are the ones kept for the component metrics (``ComponentFrames``), already
resized from ``--size`` to each frame's label resolution by the evaluation
(``obsnet.data.native``), so the files give back exactly the pixel metrics of results.json
(up to float16's rounding). float16 holds at most 65504: when a
method's finite scores exceed that in magnitude anywhere in the split (raw Mahalanobis
distances, energies), all of its maps of the split go through ``sign(x)·log1p(|x|)``, which
keeps the order of the scores (the evaluator only ranks them); the mapping is recorded in
each file (attribute ``mapping`` of ``value``) and in ``mapping.txt`` beside the files.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from obsnet.errors import UsageError
from obsnet.outputs import atomic_write

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


def choose_mapping(maps) -> str:
    """``LOG1P`` when some finite score of ``maps`` exceeds float16's range, else ``IDENTITY``."""
    peak = 0.0
    for m in maps:
        finite = np.abs(m[np.isfinite(m)])
        if finite.size:
            peak = max(peak, float(finite.max()))
    return LOG1P if peak > FLOAT16_MAX else IDENTITY


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


def export_scores(root, spec_name: str, frames, pairs) -> list[Path]:
    """Write every method's kept maps (``ComponentFrames``) for the frames ``pairs`` (the
    loader's order); returns the files written."""
    targets = [frame_target(spec_name, p.image) for p in pairs]
    sizes = []
    for p in pairs:
        with Image.open(p.label) as im:
            sizes.append((im.height, im.width))
    written = []
    for method, maps in frames.scores.items():
        if len(maps) != len(pairs):
            raise RuntimeError(f"--export_scores: {len(maps)} maps for {len(pairs)} frames")
        mapping = choose_mapping(maps)
        for (dset, fid), size, score in zip(targets, sizes, maps):
            if score.shape != size:
                raise RuntimeError(f"--export_scores: a {score.shape} map for the {size} label "
                                   f"of {fid}")
            path = score_path(root, method, dset, fid)
            write_score_map(path, score, mapping)
            written.append(path)
        for dset in sorted({d for d, _ in targets}):
            note = score_path(root, method, dset, "x").with_name("mapping.txt")
            text = f"{mapping}\n" + ("" if mapping == IDENTITY else
                                     "scores exceeded float16's range: value = sign(x)*log1p(|x|) "
                                     "of the raw score x (order-preserving)\n")
            atomic_write(note, lambda sink, t=text: sink.write(t.encode()), "--export_scores")
            written.append(note)
    return written
