"""ObsNet + Local Adversarial Attacks (Besnier et al., ICCV 2021): an observer network that
predicts, per pixel, whether a frozen segmentation network is wrong.

Laid out as data flows: ``obsnet.data`` (datasets, loaders, generated data), ``obsnet.models``
(SegNet, DeepLabv3+, observers, registry, checkpoints), ``obsnet.attacks``, ``obsnet.train``,
``obsnet.methods`` (uncertainty methods), ``obsnet.metrics`` (one module per meter), ``obsnet.evaluate``,
``obsnet.stages`` (with ``eval_stages``, ``run_checks``, ``training_state``, ``runtime``) and
``obsnet.cli`` (the command line of ``python main.py``). Importing the package imports none of
them: the public names below are loaded on first use.

Public API (``obsnet.api``): ``observe``, ``train_observer``, ``TrainingSettings``,
``Observed``, and the streaming meter ``OODMeter`` (``obsnet.metrics.ood``)."""
import importlib

__version__ = "0.1.0"
__all__ = ["observe", "train_observer", "TrainingSettings", "Observed", "OODMeter"]
_HOMES = {"observe": "obsnet.api", "train_observer": "obsnet.api",
          "TrainingSettings": "obsnet.api", "Observed": "obsnet.api", "OODMeter": "obsnet.metrics.ood"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'obsnet' has no attribute {name!r}")
