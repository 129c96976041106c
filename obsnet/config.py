"""The resolved run config of main.py: small frozen dataclasses, built once by the command line
(``obsnet.cli.resolve_config``) after its flags are parsed, checked and given their per-dataset
defaults. Everything below the command line reads these objects; nothing changes them.

    RunConfig
      stage      train_segnet | train_obsnet | test | fit_stats | fit_threshold | calibrate
      data       DataConfig: the dataset folder, the split read, image size, batches, workers
      model      ModelConfig: the segmenter (model, classes, width) and the observer asked for
      optim      OptimConfig: optimizer, epochs, attack, loss and training ablations
      paths      PathsConfig: checkpoints, the TensorBoard folder, --resume / --overwrite
      test       TestConfig: the evaluated split and methods, and the methods' settings

Each field says which flag it comes from. A stage can be run from Python with a RunConfig and a
dataset spec (``obsnet.stages.run_stage``), without a subprocess; ``RunConfig.as_flags`` gives
it back as main.py's flags, as ``config_<stage>.json`` and checkpoints (``args``) record it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from obsnet.models.observer_spec import ObserverRequest
from obsnet.stats import stats_path

STAGES = ("train_segnet", "train_obsnet", "test", "fit_stats", "fit_threshold", "calibrate")


@dataclass(frozen=True)
class DataConfig:
    """What the data loaders read: ``name`` (--data), ``folder`` (--dset_folder), ``size``
    (--size, H W), ``bsize``, ``num_workers``, ``cache_frames``, ``scale_jitter`` and
    ``skip_bad_samples`` (training: leave out samples that cannot be read)."""

    name: str = "CamVid"
    folder: str = ""
    size: tuple[int, int] = (360, 480)
    bsize: int = 8
    num_workers: int = 0
    cache_frames: bool = False
    scale_jitter: float = 0.0
    skip_bad_samples: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """The segmenter (--model, --nclass, --width_mult, its start --vgg_weights or
    --backbone_weights) and the ``observer`` the command line asks for
    (``obsnet.models.observer_spec.ObserverRequest``: --observe_layers, --obs_mlp, --obs_head,
    --obs_inputs, --obs_kind, None when not given, a checkpoint's own or the default; the
    ablations --no_residual and --no_img)."""

    model: str = "segnet"
    nclass: int = 12
    width_mult: float = 1.0
    vgg_weights: str | None = None
    backbone_weights: str | None = None
    observer: ObserverRequest = field(default_factory=ObserverRequest)

    def __post_init__(self):
        if self.observer.model is None:  # the observer observes this model
            object.__setattr__(self, "observer", replace(self.observer, model=self.model))

    @property
    def observe_layers(self) -> tuple[str, ...] | None:
        """--observe_layers: the layers a generic model's tap reads (None: its default)."""
        return self.observer.layers

    @property
    def encoder_weights(self) -> str | None:
        """The start of the segmenter's encoder: --vgg_weights for the SegNet, else
        --backbone_weights."""
        return self.vgg_weights if self.model == "segnet" else self.backbone_weights

@dataclass(frozen=True)
class OptimConfig:
    """Training: --optim, --lr, --epoch, and for the observer --adv, --epsilon, --noise,
    --drop, --focal, --no_pretrained; for the SegNet --class_weights."""

    optim: str = "SGD"
    lr: float = 2e-2
    epoch: int = 50
    adv: str = "none"
    epsilon: float = 0.1
    noise: float = 0.0
    drop: bool = False
    focal: bool = False
    no_pretrained: bool = False
    class_weights: str = "none"


@dataclass(frozen=True)
class PathsConfig:
    """Where a run reads and writes: --segnet_file, --obsnet_file (folder, or a file to test),
    --tboard, the --ensemble members, --export_scores, --export_bravo; --resume and --overwrite."""

    segnet_file: str = "ckpt/camvid/segnet.pth"
    obsnet_file: str = "ckpt/camvid/"
    tboard: str = "logs/camvid"
    ensemble: tuple[str, ...] = ()
    export_scores: str | None = None
    export_bravo: str | None = None
    resume: bool = False
    overwrite: bool = False

    @property
    def segnet_last(self) -> Path:
        """The SegNet stage's resume file: ``ckpt/segnet.pth`` -> ``ckpt/segnet.last.pth``."""
        path = Path(self.segnet_file)
        return path.with_name(f"{path.stem}.last{path.suffix or '.pth'}")

    @property
    def stats_file(self) -> Path:
        """The --fit_stats statistics of --segnet_file (``obsnet.stats.stats_path``)."""
        return stats_path(self.segnet_file)


@dataclass(frozen=True)
class TestConfig:
    """--test_only: the ``split`` (--test_split), the ``methods`` of --test_multi (parsed,
    aliases expanded), and the methods' settings (--T, --Temp, --sampling_score,
    --gauss_lambda, --odin_eps, --odin_temp); --fit_threshold's --target_tpr and
    --target_risk."""

    __test__ = False  # not a test class (pytest collects Test*)
    split: str = "test"
    methods: tuple[str, ...] = ("obsnet",)
    T: int = 50  # noqa: N815  (the flag's name)
    Temp: float = 1.2  # noqa: N815
    sampling_score: str = "entropy"
    gauss_lambda: float = 0.002
    odin_eps: float = 0.001
    odin_temp: float = 1000.0
    target_tpr: float = 0.95
    target_risk: float | None = None


@dataclass(frozen=True)
class RunConfig:
    """One resolved run of main.py (see the module's docstring). ``seed`` (-1: not seeded),
    ``amp`` (None, "auto", "float16", "bfloat16"), ``channels_last``, ``cudnn_benchmark``,
    ``num_nodes``."""

    stage: str
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    test: TestConfig = field(default_factory=TestConfig)
    seed: int = -1
    amp: str | None = None
    channels_last: bool = False
    cudnn_benchmark: bool = False
    num_nodes: int = 1

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"RunConfig.stage {self.stage!r}: not one of {', '.join(STAGES)}")

    @property
    def training(self) -> bool:
        """A training stage (the SegNet's or the observer's)."""
        return self.stage in ("train_segnet", "train_obsnet")

    def as_flags(self) -> dict:
        """The run as main.py's flags (names and JSON values: lists, not tuples): what
        ``config_<stage>.json`` and a checkpoint's ``args`` record."""
        data, model, paths, test = self.data, self.model, self.paths, self.test
        flags = {"data": data.name, "dset_folder": data.folder,
                 **_renamed(data, {"name", "folder"}), **_renamed(model, {"observer"}),
                 **_observer_flags(model.observer),
                 **_renamed(self.optim, set()), **_renamed(paths, {"ensemble"}),
                 "ensemble": ",".join(paths.ensemble) or None,
                 **_renamed(test, {"split", "methods"}), "test_split": test.split,
                 "test_multi": ",".join(test.methods),
                 "train_segnet": self.stage == "train_segnet", "test_only": self.stage == "test",
                 "fit_stats": self.stage == "fit_stats", "calibrate": self.stage == "calibrate",
                 "fit_threshold": self.stage == "fit_threshold", "seed": self.seed, "amp": self.amp,
                 "channels_last": self.channels_last, "cudnn_benchmark": self.cudnn_benchmark,
                 "num_nodes": self.num_nodes}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in flags.items()}


def _observer_flags(request: ObserverRequest) -> dict:
    """An observer request as main.py's flags."""
    return {"observe_layers": request.layers, "obs_mlp": request.obs_mlp,
            "obs_head": request.head, "obs_inputs": request.inputs, "obs_kind": request.kind,
            "no_residual": request.no_residual, "no_img": request.no_img}


def _renamed(section, left_out: set) -> dict:
    """A section's fields named as their flags (the same names), but ``left_out``."""
    return {f.name: getattr(section, f.name) for f in fields(section) if f.name not in left_out}
