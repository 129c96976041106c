"""The flags that say which segmenter and observer to build, as main.py, inference.py and
``python -m obsnet.export`` take them, and their checks (one UsageError each)."""
import argparse

from obsnet.errors import UsageError
from obsnet.models.generic import is_generic, resolve_factory
from obsnet.models.obsnet import HEADS
from obsnet.models.output_maps import INPUTS
from obsnet.models.observer_spec import KINDS, ObserverRequest
from obsnet.models.registry import SEGMENTERS, observer_name


MIN_SIDE = 32  # smallest --size side: SegNet's five 2x poolings need at least one pixel left


def check_nclass_and_size(args, spec) -> None:
    """--nclass (None: the dataset's) and --size (None: the preset's) as main.py and
    inference.py both take them."""
    if args.nclass is not None and args.nclass < spec.nclass:
        raise UsageError(f"--nclass {args.nclass} is smaller than the {spec.nclass} classes of {spec.name}")
    if args.size is not None and min(args.size) < MIN_SIDE:
        raise UsageError(f"--size {args.size[0]} {args.size[1]}: both sides must be at least "
                         f"{MIN_SIDE}")


MODEL_CHOICES = f"{', '.join(sorted(SEGMENTERS))}, torchvision:<name> or package.module:factory"
MODEL_HELP = (f"segmentation network: {MODEL_CHOICES} (e.g. torchvision:lraspp_mobilenet_v3_large; "
              f"module:factory imports your module, from the current folder too)")


def model_spec(value: str) -> str:
    """argparse type of --model: a registry name or a generic spec (checked later, when the
    user's module may be imported)."""
    if value in SEGMENTERS or is_generic(value):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: unknown (available: {MODEL_CHOICES})")


def layer_names(value: str) -> tuple[str, ...]:
    """argparse type of --observe_layers: comma-separated module names."""
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected module names separated by commas, e.g. "
                                         "backbone.layer1,backbone.layer4")
    return names


def add_model_flags(parser, width_help: str) -> None:
    """The flags that say which segmenter and observer to build, as main.py, inference.py and
    python -m obsnet.export all take them."""
    a = parser.add_argument
    a("--model", default="segnet", type=model_spec, help=MODEL_HELP)
    a("--observe_layers", type=layer_names, default=None,
      help="--model torchvision:... or module:factory: the layers the observer reads, comma-"
           "separated module names (default: per model family; a checkpoint records its own)")
    a("--nclass", type=int, default=None, help="segmenter outputs (default: the dataset's classes)")
    a("--width_mult", type=float, default=1.0, help=width_help)
    a("--obs_mlp", action="store_true", help="small observer reading one SegNet map")
    a("--obs_head", default=None, choices=HEADS,
      help="observer's last block: linear (new observers' default: no tied scores) or original "
           "(ReLU'd single channel, as the original); a checkpoint's own when it records one")
    a("--obs_inputs", default=None, choices=INPUTS,
      help="what the observer's last layer also reads of the segmenter's logits: features "
           "(nothing, as the original; the default), maps (1 - max softmax, entropy, energy) or "
           "logits (the log-softmax); a checkpoint's own when it records one")
    a("--obs_kind", default=None, choices=KINDS,
      help="observer: mirror (the segmenter's encoder-decoder, as the original; the default) or "
           "layer (the light generic LayerObserver on four SegNet maps); a checkpoint's own when "
           "it records one")


def check_model_flags(args) -> None:
    """UsageError for model flags that cannot go together, or a --model that cannot be found
    (a user's module is imported here, before any heavy work)."""
    if args.width_mult <= 0:
        raise UsageError(f"--width_mult must be positive (got {args.width_mult})")
    if args.model == "deeplabv3plus" and (args.width_mult != 1.0 or args.obs_mlp):
        raise UsageError("--model deeplabv3plus takes neither --width_mult nor --obs_mlp")
    check_observer_choice(args)
    if not is_generic(args.model):
        if args.observe_layers:
            raise UsageError(f"--observe_layers is for --model torchvision:<name> or "
                             f"package.module:factory; --model {args.model} has its own observer")
        return
    try:
        resolve_factory(args.model)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.obs_mlp:
        raise UsageError(f"--obs_mlp reads one SegNet map: not available with --model {args.model}")


def check_observer_choice(args) -> None:
    """UsageError for an observer the model has not (``--obs_kind``, ``--obs_inputs``), or an
    ablation that contradicts what it reads (``--no_residual`` with the logits' maps)."""
    inputs, kind = args.obs_inputs or "features", args.obs_kind or "mirror"
    try:
        observer_name(args.model, args.obs_mlp, inputs, kind)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if getattr(args, "no_residual", False) and inputs != "features":
        raise UsageError(f"--no_residual with --obs_inputs {inputs}: the observer would still "
                         f"read the segmenter's logits; drop one")


def observer_request(args) -> ObserverRequest:
    """The observer the command line asks for (what it does not give is None, the three flags
    False); a checkpoint's record wins over it, a contradiction is refused
    (``obsnet.models.observer_spec.resolve_observer``)."""
    return ObserverRequest(model=args.model, kind=args.obs_kind, head=args.obs_head,
                           inputs=args.obs_inputs, layers=args.observe_layers,
                           obs_mlp=bool(args.obs_mlp),
                           # inference.py and the export have no ablation flags: the
                           # checkpoint's record gives them
                           no_residual=bool(getattr(args, "no_residual", False)),
                           no_img=bool(getattr(args, "no_img", False)))
