"""What the subcommands share: exit codes and errors, the quantization flags, devices, sources, output helpers.

Nothing here imports diffusers or transformers at module level, so ``halfbyte --help`` stays fast.
"""

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..formats.codebooks import BLOCKSIZES_4BIT, QUANT_TYPES

# Exit codes (listed in ``halfbyte --help``).
OK = 0
FAILED = 1  # the work failed: a corrupt or unsupported checkpoint, a check that did not pass
USAGE = 2  # bad flags or flag combinations (argparse uses 2 as well)
NOT_FOUND = 3  # a path, Hub id (e.g. offline and not cached), subfolder or component does not exist
NO_DEVICE = 4  # the requested device (e.g. --device cuda) is not available
INTERRUPTED = 130

EXIT_CODES_HELP = f"""exit codes:
  {OK}    success
  {FAILED}    the work failed (corrupt or unsupported checkpoint, failed check)
  {USAGE}    usage error: unknown or conflicting flags
  {NOT_FOUND}    not found: path, Hub id (offline and not cached), subfolder or component
  {NO_DEVICE}    device unavailable (e.g. --device cuda without a CUDA GPU)
  {INTERRUPTED}  interrupted"""

KINDS = (*QUANT_TYPES, "int8")
DTYPES = ("float16", "bfloat16", "float32")
# Components quantized by default, per pipeline class: the big transformer and the T5 text encoder.
DEFAULT_COMPONENTS = {"FluxPipeline": ("transformer", "text_encoder_2"),
                      "StableDiffusion3Pipeline": ("transformer", "text_encoder_3")}
# Files a pipeline download leaves out: other weight formats than safetensors (halfbyte reads only safetensors).
IGNORED_FILES = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.gguf"]


class CliError(Exception):
    """An error to report as one line ``halfbyte CMD: error: MESSAGE`` with exit status ``code``."""

    def __init__(self, message: str, code: int = FAILED):
        super().__init__(message)
        self.code = code


def common_parent() -> argparse.ArgumentParser:
    """Flags every subcommand takes (after its name): --quiet, --verbose."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("output")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notices (errors only)")
    g.add_argument("-v", "--verbose", action="store_true",
                   help="keep diffusers'/transformers' warnings and show tracebacks on errors")
    return p


def add_config_args(p: argparse.ArgumentParser, per_component: bool, default_kind: str | None = "nf4") -> None:
    """The flags that map onto ``halfbyte.BitsAndBytesConfig`` fields, one to one."""
    g = p.add_argument_group("quantization (halfbyte.BitsAndBytesConfig)")
    if per_component:
        g.add_argument("--quant", action="append", default=[], metavar="[COMPONENT=]KIND",
                       help=f"format {'|'.join(KINDS)} (load_in_4bit + bnb_4bit_quant_type, or load_in_8bit); "
                            "COMPONENT=KIND sets one pipeline component (repeatable; KIND 'none' keeps it in "
                            "floating point); a bare KIND applies to the default components (default nf4)")
    else:
        g.add_argument("--quant", choices=KINDS, default=default_kind,
                       help=f"format (load_in_4bit + bnb_4bit_quant_type, or load_in_8bit; default {default_kind})")
    g.add_argument("--double-quant", action="store_true", help="4-bit: bnb_4bit_use_double_quant=True")
    g.add_argument("--compute-dtype", choices=DTYPES, default=None,
                   help="4-bit: bnb_4bit_compute_dtype (default: the activations' dtype)")
    g.add_argument("--blocksize", type=int, default=None, choices=BLOCKSIZES_4BIT,
                   help="4-bit: bnb_4bit_blocksize (default 64)")
    g.add_argument("--threshold", type=float, default=None,
                   help="int8: llm_int8_threshold, the outlier threshold (default 6.0; 0 turns it off)")
    g.add_argument("--skip", nargs="+", action="extend", default=[], metavar="MODULE",
                   help="llm_int8_skip_modules: module names or dotted paths kept in floating point")


def parse_quant_map(values: list[str], default_components: tuple[str, ...]) -> dict[str, str | None]:
    """``--quant`` values -> {component: kind or None (keep floating point)}.

    A bare ``KIND`` sets every default component; ``COMPONENT=KIND`` sets (or adds) one, later values winning.
    With no value the default components get nf4.
    """
    result: dict[str, str | None] = dict.fromkeys(default_components, "nf4")
    for value in values:
        name, sep, kind = value.rpartition("=")
        kind = kind.strip().lower()
        if kind not in (*KINDS, "none"):
            raise CliError(f"--quant {value!r}: the format must be one of {', '.join(KINDS)} or none", USAGE)
        if not sep:
            result.update(dict.fromkeys(default_components, kind))
        elif not name.strip():
            raise CliError(f"--quant {value!r}: empty component name (expected COMPONENT=KIND)", USAGE)
        else:
            result[name.strip()] = kind
    return {k: (None if v == "none" else v) for k, v in result.items()}


def check_config_flags(args: argparse.Namespace, kinds: set[str]) -> None:
    """Refuse flags that fit none of the formats in use (e.g. --double-quant with int8 only)."""
    four = kinds & {"nf4", "fp4"}
    for flag, value in (("--double-quant", args.double_quant), ("--compute-dtype", args.compute_dtype),
                        ("--blocksize", args.blocksize)):
        if value and not four:
            raise CliError(f"{flag} applies to the 4-bit formats (nf4, fp4), but the format in use is "
                           f"{', '.join(sorted(kinds)) or 'none'}", USAGE)
    if args.threshold is not None:
        if "int8" not in kinds:
            raise CliError(f"--threshold applies to int8, but the format in use is {', '.join(sorted(kinds))}", USAGE)
        if not args.threshold >= 0:
            raise CliError(f"--threshold must be >= 0, got {args.threshold}", USAGE)


def config_for(kind: str, args: argparse.Namespace):
    """The ``halfbyte.BitsAndBytesConfig`` for one format and the shared flags."""
    from ..config import BitsAndBytesConfig

    skip = list(args.skip) or None
    if kind == "int8":
        threshold = 6.0 if args.threshold is None else args.threshold
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=args.double_quant,
                              bnb_4bit_compute_dtype=args.compute_dtype, bnb_4bit_blocksize=args.blocksize or 64,
                              llm_int8_skip_modules=skip)


def kind_of(config) -> str:
    """"nf4", "fp4" or "int8" (+ "+dq" for double quantization) for a halfbyte config."""
    if config.load_in_8bit:
        return "int8"
    return config.bnb_4bit_quant_type + ("+dq" if config.bnb_4bit_use_double_quant else "")


# --- environment --------------------------------------------------------------------------------------------------


_ENV = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}
_undo: list = []  # restores what quiet_hf_libraries changed, run when output_settings exits


@contextlib.contextmanager
def output_settings(args: argparse.Namespace):
    """For the duration of a command: progress bars only on a terminal and never with --quiet; library chatter
    (warnings, info logs) off unless --verbose. Everything is restored on exit (main() may run in-process)."""
    from ..io import checkpoint

    saved_env = {k: os.environ.get(k) for k in (*_ENV, "HALFBYTE_NO_PROGRESS")}
    bnb_logger = logging.getLogger("bitsandbytes")
    saved_level, saved_progress = bnb_logger.level, checkpoint._progress_enabled
    with warnings.catch_warnings():
        if args.quiet:
            checkpoint.disable_progress_bars()
        if not args.verbose:
            for key, value in _ENV.items():  # read when the libraries are imported
                os.environ.setdefault(key, value)
            # bitsandbytes logs a warning about an optional CPU kernel package on import; nothing halfbyte uses.
            bnb_logger.setLevel(logging.ERROR)
            for module in ("torch", "diffusers", "transformers", "accelerate", "huggingface_hub"):
                warnings.filterwarnings("ignore", module=module + r"(\.|$)")
        try:
            yield
        finally:
            while _undo:
                _undo.pop()()
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            bnb_logger.setLevel(saved_level)
            if saved_progress:
                checkpoint.enable_progress_bars()


def quiet_hf_libraries(args: argparse.Namespace, progress: bool = True) -> None:
    """diffusers/transformers logs at error level unless --verbose; their progress bars follow ours (none with
    ``progress=False``, nor halfbyte's). FAILED if they are not installed."""
    diffusers, transformers = require_hf_libraries()

    for lib in (diffusers, transformers):
        logging_ = lib.utils.logging
        if not args.verbose:
            _undo.append(lambda lg=logging_, v=logging_.get_verbosity(): lg.set_verbosity(v))
            logging_.set_verbosity_error()
        if args.quiet or not progress or not sys.stderr.isatty():
            _undo.append(logging_.enable_progress_bar if logging_.is_progress_bar_enabled() else (lambda: None))
            logging_.disable_progress_bar()
    if not progress:
        from ..io import checkpoint

        checkpoint.disable_progress_bars()  # re-enabled by output_settings


def require_hf_libraries():
    """(diffusers, transformers), or a CliError saying how to install them."""
    try:
        import diffusers
        import transformers
    except ImportError as e:
        raise CliError(f"this command needs diffusers and transformers: pip install 'halfbyte[hf]' ({e})") from None
    return diffusers, transformers


def notice(args: argparse.Namespace, message: str) -> None:
    """A one-line status message on stderr (silenced by --quiet)."""
    if not args.quiet:
        print(f"halfbyte: {message}", file=sys.stderr, flush=True)


def resolve_device(name: str, args: argparse.Namespace):
    """``auto``: CUDA if available, else the CPU with a notice; ``cuda[:i]`` refused (NO_DEVICE) without it."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        notice(args, "no CUDA GPU found; running on the CPU (slow for real models)")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise CliError(f"--device {name!r}: {e}", USAGE) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device {name} was asked for, but no CUDA GPU is available (torch "
                           f"{torch.__version__}); use --device cpu or --device auto", NO_DEVICE)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CliError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)", NO_DEVICE)
    elif device.type != "cpu":
        raise CliError(f"--device {name}: halfbyte's command line runs on cpu or cuda", USAGE)
    return device


def dtype_of(name: str):
    import torch

    return getattr(torch, name)


# --- sources ------------------------------------------------------------------------------------------------------


def looks_local(text: str) -> bool:
    """Whether ``text`` names a path rather than a Hub repo id ("org/name" or "name")."""
    return Path(text).expanduser().exists() or os.path.isabs(text) or text.startswith((".", "~")) \
        or text.count("/") > 1 or text.endswith("/")


def hub_snapshot(repo_id: str, revision: str | None, allow_patterns: list[str] | None = None,
                 ignore_patterns: list[str] | None = None) -> Path:
    """Download (or find in the cache) the files of ``repo_id`` that match; NOT_FOUND with the reason otherwise."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns,
                                      ignore_patterns=ignore_patterns))
    except Exception as e:  # offline without a cached snapshot, unknown repo, auth or network errors
        if constants.HF_HUB_OFFLINE:
            why = "HF_HUB_OFFLINE is set and the Hugging Face cache has no snapshot of it"
        else:
            why = f"the Hugging Face Hub could not provide it ({type(e).__name__}: {str(e).splitlines()[0]})"
        raise CliError(f"{repo_id!r} is not a local directory, and {why}", NOT_FOUND) from e


def hub_file(repo_id: str, filename: str, revision: str | None) -> Path | None:
    """One file of a Hub repo (downloaded or cached), or None if the repo has no such file."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except LocalEntryNotFoundError as e:  # (a subclass of EntryNotFoundError: first)
        # offline: the file is not cached (the repo itself may be, without this file)
        if hub_cached(repo_id, revision):
            return None
        # raised offline, and also when the Hub cannot be reached at all
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hugging Face Hub cannot be reached"
        raise CliError(f"{repo_id!r} is not a local directory, {why}, and the Hugging Face cache has no snapshot "
                       "of it", NOT_FOUND) from e
    except EntryNotFoundError:  # the repo exists and lacks the file
        return None
    except Exception as e:
        raise CliError(f"{repo_id!r} is not a local directory, and the Hugging Face Hub could not provide "
                       f"{filename} ({type(e).__name__}: {str(e).splitlines()[0]})", NOT_FOUND) from e


def hub_cached(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    for name in ("model_index.json", "config.json"):
        if isinstance(try_to_load_from_cache(repo_id, name, revision=revision), str):
            return True
    return False


@dataclass
class Source:
    """A checkpoint given on the command line, as a local directory (a Hub id's cached snapshot)."""

    text: str  # as the user wrote it
    root: Path  # the directory: a pipeline root, or the model directory (``subfolder`` applied)
    index: dict | None  # model_index.json of a pipeline, None for a single model
    repo_id: str | None = None  # for a Hub id: the repo, the revision, and the snapshot folder root lies in
    revision: str | None = None
    snapshot: Path | None = None

    def repo_path(self, path: Path) -> str:
        """``path`` (inside the snapshot) as a file name within the Hub repo."""
        return path.relative_to(self.snapshot).as_posix()

    @property
    def components(self) -> dict[str, tuple[str, str]]:
        return pipeline_components(self.index) if self.index is not None else {}

    def component_dir(self, name: str) -> Path:
        """The directory of pipeline component ``name``; NOT_FOUND naming the components there are."""
        if name not in self.components:
            raise CliError(f"{self.text}: the pipeline has no component {name!r} (model_index.json lists "
                           f"{', '.join(self.components) or 'none'})", NOT_FOUND)
        directory = self.root / name
        if not directory.is_dir():
            raise CliError(f"{self.text}: model_index.json lists {name!r}, but {directory} does not exist", NOT_FOUND)
        return directory


def open_source(text: str, revision: str | None = None, subfolder: str | None = None,
                components: list[str] | None = None, weights: bool = True) -> Source:
    """Resolve a local directory or a Hub id (downloading or reading the cache) to a ``Source``.

    ``subfolder``: the model lives in that folder (the result is a single model). ``components``: for a Hub
    pipeline, download only these component folders (default all). ``weights=False``: download only JSON files.
    """
    repo_id = snapshot = None
    if looks_local(text):
        root = Path(text).expanduser()
        if not root.exists():
            raise CliError(f"{text}: no such directory", NOT_FOUND)
        if not root.is_dir():
            raise CliError(f"{text} is a file; expected a checkpoint directory (a pipeline or a model)", NOT_FOUND)
    else:
        files = ["*.json"] if not weights else ["*"]
        index_file = None if subfolder else hub_file(text, "model_index.json", revision)
        if index_file is not None:
            names = components if components is not None else list(pipeline_components(read_json(index_file)))
            allow = ["model_index.json"] + [f"{n}/{f}" for n in names for f in files]
        else:
            prefix = f"{subfolder.strip('/')}/" if subfolder else ""
            allow = [f"{prefix}{f}" for f in (["*.json"] if not weights else ["*.json", "*.safetensors"])]
        root = snapshot = hub_snapshot(text, revision, allow, IGNORED_FILES)
        repo_id = text
    if subfolder:
        sub = root / subfolder
        if not sub.is_dir():
            raise CliError(f"{text}: no subfolder {subfolder!r} ({sub} does not exist)", NOT_FOUND)
        root = sub
    hub = dict(repo_id=repo_id, revision=revision, snapshot=snapshot)
    if (root / "model_index.json").is_file():
        return Source(text, root, read_json(root / "model_index.json"), **hub)
    if (root / "config.json").is_file():
        return Source(text, root, None, **hub)
    raise CliError(f"{text}: neither a diffusers pipeline (model_index.json) nor a model (config.json) in {root}",
                   NOT_FOUND)


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CliError(f"{path} does not exist", NOT_FOUND) from None
    except ValueError as e:
        raise CliError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CliError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def pipeline_components(index: dict) -> dict[str, tuple[str, str]]:
    """model_index.json -> {component: (library, class name)} for the components that are set."""
    return {k: (v[0], v[1]) for k, v in index.items()
            if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] and v[1]}


def model_class(library: str, name: str, where: str):
    """The diffusers or transformers class ``name``; FAILED naming ``where`` if there is none."""
    if library not in ("diffusers", "transformers"):
        raise CliError(f"{where}: {library}.{name} is not a diffusers or transformers model")
    module = __import__(library)
    cls = getattr(module, name, None)
    if cls is None:
        raise CliError(f"{where}: {library} {module.__version__} has no class {name}")
    return cls


def class_of_model_dir(directory: Path) -> tuple[str, str]:
    """(library, class name) of a single-model directory, from its config.json."""
    config = read_json(directory / "config.json")
    if isinstance(config.get("_class_name"), str):
        return "diffusers", config["_class_name"]
    arch = config.get("architectures")
    if isinstance(arch, list) and arch and isinstance(arch[0], str):
        return "transformers", arch[0]
    raise CliError(f"{directory / 'config.json'} names no model class (neither diffusers' _class_name nor "
                   "transformers' architectures)")


def is_quantized_dir(directory: Path) -> bool:
    config_path = directory / "config.json"
    return config_path.is_file() and read_json(config_path).get("quantization_config") is not None


# --- output -------------------------------------------------------------------------------------------------------


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False, default=str))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def table(rows: list[list[str]], header: list[str], right: set[int] = frozenset()) -> str:
    """Rows as aligned text columns (the columns in ``right`` right-aligned)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` for a temporary sibling of ``path``, fsync it and rename it over ``path``: readers
    see the old file or the complete new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the result private, unlike a plain open()
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a model directory (index + shards, or the single file), as the loaders pick them."""
    for stem in ("diffusion_pytorch_model", "model"):
        index = directory / f"{stem}.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CliError(f"{index}: no weight_map (not a safetensors index)")
            return [directory / name for name in sorted(set(weight_map.values()))]
        single = directory / f"{stem}.safetensors"
        if single.is_file():
            return [single]
    return []


def file_bytes(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files if f.is_file())
