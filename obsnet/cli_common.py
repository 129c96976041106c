"""Command-line plumbing shared by main.py and inference.py: one-line errors, exit codes,
and graceful stops on SIGINT / SIGTERM."""
import argparse
import contextlib
import math
import os
import re
import signal
import sys
import threading
import warnings

from obsnet.data.errors import DatasetError, WorkerDied
from obsnet.errors import ObsnetWarning, UsageError
from obsnet.models.checkpoint import CheckpointError
from obsnet.models.generic import is_generic, resolve_factory
from obsnet.models.obsnet import HEADS
from obsnet.models.output_maps import INPUTS
from obsnet.models.registry import KINDS, SEGMENTERS, observer_name


ANSI_ESCAPES = re.compile(r"\x1b\[[0-9;]*m")


class Interrupted(Exception):
    """Training stopped by a signal at a consistent point; ``code`` is 128 + the signal
    number (130 for SIGINT, 143 for SIGTERM) and the message says what can be resumed."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.code = 128 + int(signum)


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loops, handled as Ctrl-C is: a KeyboardInterrupt (every
    ``finally`` runs: temporary files and locks are removed), exit code 143."""

    def __init__(self):
        super().__init__(f"interrupted ({signal_name(signal.SIGTERM)})")
        self.code = 128 + int(signal.SIGTERM)


class SecondSignal(KeyboardInterrupt):
    """A second SIGINT / SIGTERM while a graceful stop was pending: stop at once, exit code
    128 + that signal's number (a KeyboardInterrupt, so that no ``except Exception`` holds it)."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted again ({signal_name(signum)}) while stopping: stopped at "
                         f"once, nothing saved from the current epoch")
        self.code = 128 + int(signum)


RUNTIME_ERRORS = (DatasetError, CheckpointError, FloatingPointError, OSError, ValueError,
                  WorkerDied)
MIN_SIDE = 32  # smallest --size side: SegNet's five 2x poolings need at least one pixel left


def parse_checked(parser, argv):
    """``parser.parse_args(argv)``, then a UsageError for a NaN or infinite value of any float
    flag (``nan <= 0`` is false, so range checks alone let them through)."""
    args = parser.parse_args(argv)
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.type is not float or value is None:
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if not math.isfinite(item):
                raise UsageError(f"{action.option_strings[0]} must be a finite number (got {item})")
    return args


def explicit_flags(parser, argv) -> frozenset[str]:
    """The destinations of the flags ``argv`` gives explicitly (parsed again with every
    default suppressed); ``argv`` must already parse."""
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        return frozenset(vars(parser.parse_known_args(argv)[0]))
    finally:
        for action, default in saved:
            action.default = default


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


def model_flags(args) -> dict:
    """The observer's flags the command line gives, for ``merge_observer_flags`` (those of a
    checkpoint that records them win; a conflict is an error there)."""
    return {"obs_mlp": args.obs_mlp, "head": args.obs_head, "model": args.model,
            "layers": args.observe_layers, "inputs": args.obs_inputs, "kind": args.obs_kind}


class StopSignal:
    """Context manager: SIGINT and SIGTERM only set a flag (``signum``), which the training
    loops check after each optimizer step; nothing is saved from the handler itself.

    A second signal while the flag is set stops at once (SecondSignal, exit code 128 + the
    second signal's number: 130 for SIGINT, 143 for SIGTERM).
    Outside the main thread (where handlers cannot be installed) it does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise SecondSignal(signum)
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def signal_name(signum: int) -> str:
    """"SIGTERM" for 15, and so on."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# torch's own messages when a worker dies: from its SIGCHLD handler, or when a batch is missing
TORCH_WORKER_DEATH = re.compile(r"DataLoader worker \(pid\(?s?\)? ?([\d, ]+)\) "
                                r"(?:is killed by signal: ([^.]+)|exited unexpectedly)")
SIGNAL_BY_TEXT = {signal.strsignal(s): s for s in signal.Signals if signal.strsignal(s)}


def worker_death(exc: BaseException) -> WorkerDied | None:
    """torch's RuntimeError of a DataLoader worker that died, as a WorkerDied; else None."""
    match = TORCH_WORKER_DEATH.search(str(exc)) if isinstance(exc, RuntimeError) else None
    if match is None:
        return None
    signum = SIGNAL_BY_TEXT.get((match.group(2) or "").strip())
    return WorkerDied(match.group(1).strip(), -signum if signum else None)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` as one line.

    A DataLoader worker's exception is re-raised by PyTorch as "Caught X in DataLoader worker
    process N. Original Traceback ...": its last line "X: message" holds the original cause.
    """
    text = str(exc).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        name = type(exc).__name__
        for prefix in (f"{type(exc).__module__}.{name}: ", f"{name}: "):
            if last.startswith(prefix):
                return last[len(prefix):]
        return last
    return str(exc)


def run_friendly(program: str, fn, argv) -> int:
    """Call ``fn(argv)``; print known errors as one line (exit 2 usage, 1 runtime,
    128 + signal number for a graceful stop).

    ``--debug`` in ``argv`` re-raises them with their traceback. Our own warnings
    (``ObsnetWarning``) are printed as one line, ``program: warning: ...``.
    """
    with warnings.catch_warnings(), sigterm_as_interrupt():
        if "--debug" not in argv:
            warnings.showwarning = one_line_warnings(program, warnings.showwarning)
        return _run_reporting_errors(program, fn, argv)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within: SIGTERM raises ``Terminated`` in the main thread, as SIGINT raises
    KeyboardInterrupt (the training loops' ``StopSignal`` overrides it while they run).

    Nothing changes outside the main thread or where SIGTERM was not at its default (e.g.
    ignored by the caller). A process forked meanwhile (a worker that did not set its own
    handler) dies of the signal as before: only this process raises.
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    owner = os.getpid()

    def handle(signum, frame):
        if os.getpid() != owner:  # a forked child: the default action, death by the signal
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Terminated()

    signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def one_line_warnings(program: str, show_other):
    """A ``warnings.showwarning`` that prints ``ObsnetWarning`` as one line and hands the
    others to ``show_other``."""
    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, ObsnetWarning):
            print(f"{program}: warning: {message}", file=sys.stderr)
        else:
            show_other(message, category, filename, lineno, file, line)
    return show


def _run_reporting_errors(program: str, fn, argv) -> int:
    try:
        return fn(argv)
    except Interrupted as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        return exc.code
    except (UsageError, RuntimeError, *RUNTIME_ERRORS) as exc:
        known = exc if isinstance(exc, (UsageError, *RUNTIME_ERRORS)) else worker_death(exc)
        if known is None or "--debug" in argv:
            raise
        print(f"{program}: error: {ANSI_ESCAPES.sub('', one_line(known))}", file=sys.stderr)
        return 2 if isinstance(known, UsageError) else 1
    except KeyboardInterrupt as exc:
        print(f"{program}: {str(exc) or f'interrupted ({signal_name(signal.SIGINT)})'}",
              file=sys.stderr)
        return getattr(exc, "code", 130)
