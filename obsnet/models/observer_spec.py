"""What an observer is: its ``ObserverSpec`` (which segmenter it observes, its kind, head, inputs,
layers and ablations), as its checkpoint records it, and how a command line's ``ObserverRequest``
meets that record (``resolve_observer``: the checkpoint's wins, a contradiction is refused)."""
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from obsnet.models.checkpoint import CheckpointError, load_checkpoint
from obsnet.models.obsnet import HEADS
from obsnet.models.output_maps import INPUTS

KINDS = ("mirror", "layer")  # --obs_kind: the segmenter's mirror, or the generic LayerObserver
DEFAULT_HEAD = "linear"  # of new observers; checkpoints that record no head have the original's
ORIGINAL_HEAD = "original"
# Of new observers; checkpoints that record none read no logits and mirror the segmenter.
DEFAULT_INPUTS, DEFAULT_KIND = "features", "mirror"
OBSERVER_FLAGS = ("obs_mlp", "no_residual", "no_img")  # what changes how it runs; each: --<name>
RECORDED_CHOICES = {"inputs": INPUTS, "kind": KINDS}  # each: the flag --obs_<name>


@dataclass(frozen=True)
class ObserverRequest:
    """The observer a command line asks for: None where it does not say (then a checkpoint's
    record, else the defaults, decide); the three flags False unless given."""

    model: str | None = None
    kind: str | None = None
    head: str | None = None
    inputs: str | None = None
    layers: tuple[str, ...] | None = None
    obs_mlp: bool = False
    no_residual: bool = False
    no_img: bool = False


@dataclass(frozen=True)
class ObserverSpec:
    """How to build and run an observer: the segmenter spec it observes (``model``), its kind
    (``KINDS``), head (``obsnet.models.obsnet.HEADS``), what it reads of the logits
    (``inputs``: ``obsnet.models.output_maps.INPUTS``), the layers a generic segmenter's
    FeatureTap observes for it (None: the model's default), the light variant (``obs_mlp``) and
    the ablations (``no_residual``, ``no_img``) its forward pass applies."""

    model: str | None
    kind: str = DEFAULT_KIND
    head: str = DEFAULT_HEAD
    inputs: str = DEFAULT_INPUTS
    layers: tuple[str, ...] | None = None
    obs_mlp: bool = False
    no_residual: bool = False
    no_img: bool = False

    def __post_init__(self):
        for name, choices in (("head", HEADS), *RECORDED_CHOICES.items()):
            if getattr(self, name) not in choices:
                raise ValueError(f"--obs_{name} {getattr(self, name)}: unknown (available: "
                                 f"{', '.join(choices)})")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers) or None)

    def record(self) -> dict:
        """What an observer checkpoint stores under ``"observer"`` (the layers as a list)."""
        record = asdict(self)
        record["layers"] = list(self.layers) if self.layers else None
        return {k: record[k] for k in (*OBSERVER_FLAGS, "head", "model", "layers", "inputs", "kind")}


def observer_path(obsnet_file) -> Path:
    """An observer checkpoint: the file itself, or a folder's ``best.pth``."""
    path = Path(obsnet_file)
    return path / "best.pth" if path.is_dir() else path


def new_observer_spec(given: ObserverRequest, model: str) -> ObserverSpec:
    """The spec of an observer to train on ``model``: what ``given`` says, else the defaults
    (linear head, features, mirror)."""
    return ObserverSpec(model=model, kind=given.kind or DEFAULT_KIND,
                        head=given.head or DEFAULT_HEAD, inputs=given.inputs or DEFAULT_INPUTS,
                        layers=given.layers, obs_mlp=given.obs_mlp,
                        no_residual=given.no_residual, no_img=given.no_img)


def recorded_spec(obsnet_file) -> ObserverSpec | None:
    """The spec an observer checkpoint records, or None for one that records none (the
    original's plain state_dicts). Each value is checked as data (a CheckpointError names the
    file and the entry); what earlier versions did not record has their value (the original
    head, features, mirror, no ablation)."""
    path = observer_path(obsnet_file)
    checkpoint = load_checkpoint(path)
    recorded = checkpoint.get("observer") if isinstance(checkpoint, dict) else None
    if not isinstance(recorded, dict):
        return None
    head, model, layers = (recorded.get("head", ORIGINAL_HEAD), recorded.get("model"),
                           recorded.get("layers"))
    if head not in HEADS:
        raise CheckpointError(f"{path}: its recorded observer head is not one of {', '.join(HEADS)}")
    if model is not None and not isinstance(model, str):
        raise CheckpointError(f"{path}: its recorded observer model is not a model spec")
    if layers is not None and not (isinstance(layers, (list, tuple)) and layers
                                   and all(isinstance(name, str) and name for name in layers)):
        raise CheckpointError(f"{path}: its recorded observer layers are not module names")
    chosen = {"inputs": recorded.get("inputs", DEFAULT_INPUTS), "kind": recorded.get("kind", DEFAULT_KIND)}
    for name, value in chosen.items():
        if value not in RECORDED_CHOICES[name]:
            raise CheckpointError(f"{path}: its recorded observer {name} is not one of "
                                  f"{', '.join(RECORDED_CHOICES[name])}")
    flags = {k: bool(recorded.get(k, False)) for k in OBSERVER_FLAGS}
    return ObserverSpec(model=model, head=head, layers=tuple(layers) if layers else None,
                        **chosen, **flags)


def resolve_observer(obsnet_file, given: ObserverRequest | ObserverSpec) -> ObserverSpec:
    """The spec to run an observer checkpoint with: the one it records (``recorded_spec``),
    else ``given``'s values (the original head unless ``given.head`` says otherwise, features,
    mirror). What ``given`` asks for that contradicts the record (a flag it was trained
    without, another head, inputs, kind, model or layers) is a one-line CheckpointError: it
    would score with another network. A resolved spec passed again as ``given`` passes."""
    recorded = recorded_spec(obsnet_file)
    if recorded is None:
        return ObserverSpec(model=given.model, kind=given.kind or DEFAULT_KIND,
                            head=given.head or ORIGINAL_HEAD, inputs=given.inputs or DEFAULT_INPUTS,
                            layers=given.layers, obs_mlp=given.obs_mlp,
                            no_residual=given.no_residual, no_img=given.no_img)
    refuse_contradiction(observer_path(obsnet_file), given, recorded)
    return recorded if recorded.model is not None else replace(recorded, model=given.model)


def refuse_contradiction(path: Path, given, recorded: ObserverSpec) -> None:
    """CheckpointError (one line naming the flag) for what ``given`` asks that ``recorded``
    (the checkpoint at ``path``) contradicts."""
    for flag in OBSERVER_FLAGS:
        if getattr(given, flag) and not getattr(recorded, flag):
            raise CheckpointError(f"{path}: this observer was trained without --{flag}; drop "
                                  f"--{flag} (its checkpoint records how it was trained)")
    if given.head not in (None, recorded.head):
        raise CheckpointError(f"{path}: this observer has the {recorded.head} head, not "
                              f"--obs_head {given.head}; drop --obs_head (its checkpoint "
                              f"records its head)")
    for name in RECORDED_CHOICES:
        mine, theirs = getattr(given, name), getattr(recorded, name)
        if mine not in (None, theirs):
            raise CheckpointError(f"{path}: this observer has --obs_{name} {theirs}, not "
                                  f"--obs_{name} {mine}; drop --obs_{name} (its checkpoint "
                                  f"records it)")
    if given.model not in (None, recorded.model) and recorded.model is not None:
        raise CheckpointError(f"{path}: this observer was trained with --model "
                              f"{recorded.model}, not --model {given.model}")
    if given.layers and tuple(given.layers) != recorded.layers:
        recorded_layers = ",".join(recorded.layers or ()) or "its model's default"
        raise CheckpointError(f"{path}: this observer reads --observe_layers {recorded_layers}; "
                              f"drop --observe_layers (its checkpoint records its layers)")
