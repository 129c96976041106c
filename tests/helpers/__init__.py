"""What the test modules share, defined once (no test module imports another).

- runner: the in-process command-line runner (``main_py``, ``python``, ``spawn``...) and the
  flags of a tiny run (``TINY``, ``paths``);
- devices: the CPU, and CUDA marked ``gpu`` (skipped without a device);
- nets: tiny SegNets and observers, in memory or as checkpoint files;
- camvid, cityscapes, anomaly_seg, smiyc, pasted: dataset folders in each real layout;
- reference: scikit-learn's values for the metric tests;
- contracts: the contracts every attack mask and uncertainty method passes (docs/extending.md);
- api_toys, toy_segmenter: user segmenters for the Python API and ``--model module:factory``.
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
SHARED = ROOT.parent / "shared"  # the real data and references beside the checkout
