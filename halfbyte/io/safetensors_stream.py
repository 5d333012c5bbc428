"""Checkpoint file primitives: shard planning, durable shard writes, atomic directory swaps, lazy shard reading.

Layout and names follow what diffusers/transformers ``save_pretrained`` write: ``<stem>.safetensors``, or shards
``<stem>-00001-of-0000N.safetensors`` plus ``<stem>.safetensors.index.json`` (``{"metadata": {"total_size": ...},
"weight_map": {key: file}}``, ``json.dumps(indent=2, sort_keys=True)``). Shards are cut as
``huggingface_hub.split_torch_state_dict_into_shards`` cuts them (in order; a group larger than the limit gets a
shard of its own), except that the unit is a *group* of keys, so a quantized layer never spans two files.
"""

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

_DTYPE_SIZES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
                "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """``5_000_000_000``, ``"5GB"`` (powers of 10) or ``"5GiB"`` (powers of 2) -> bytes."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size) if isinstance(size, str) else None
    if m is None or m.group(2).upper() not in _SIZE_UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"max_shard_size must be a positive int or a string such as '5GB', got {size!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def plan_shards(groups: list[list[str]], sizes: dict[str, int], max_shard_size: int,
                stem: str) -> dict[str, list[str]]:
    """Cut ``groups`` (lists of keys, in file order) into shards of at most ``max_shard_size`` bytes each.

    Returns {file name: keys}: one ``<stem>.safetensors``, or ``<stem>-0000i-of-0000N.safetensors`` files.
    """
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for group in groups:
        size = sum(sizes[k] for k in group)
        if size > max_shard_size:
            shards.append(list(group))
            continue
        if current and current_size + size > max_shard_size:
            shards.append(current)
            current, current_size = [], 0
        current += group
        current_size += size
    if current or not shards:
        shards.append(current)
    if len(shards) == 1:
        return {f"{stem}.safetensors": shards[0]}
    n = len(shards)
    return {f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors": keys for i, keys in enumerate(shards)}


def index_json(files: dict[str, list[str]], sizes: dict[str, int], extra_metadata: dict | None = None) -> str:
    """The ``.safetensors.index.json`` text for sharded ``files``."""
    metadata = dict(extra_metadata or {})
    metadata["total_size"] = sum(sizes[k] for keys in files.values() for k in keys)
    weight_map = {k: name for name, keys in files.items() for k in keys}
    return json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n"


def write_shard(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str], durable: bool = True) -> None:
    """Write one safetensors file (CPU, contiguous tensors); ``durable``: fsync it."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    if durable:
        _fsync(path)


def write_text(path: Path, text: str, durable: bool = True) -> None:
    """Write a UTF-8 text file; ``durable``: fsync it."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        if durable:
            os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # directories cannot be fsynced on some platforms (Windows); files always can
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (same file system: instant, no extra space); copy where links are refused."""
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_file)
    else:
        _link_file(src, dst)


def _link_file(src, dst) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:  # file systems without hard links: a plain copy keeps the same content
        shutil.copy2(src, dst)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, replaced: Callable[[str], bool],
                     durable: bool = True) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``target`` to write into; on success it becomes ``target``.

    If ``target`` exists, its entries for which ``replaced(name)`` is False (a README, tokenizer files, a .git
    folder) are carried into the new directory (hard links), the old directory is renamed away, the new one
    renamed in, and the old one removed. On any exception, KeyboardInterrupt included, the temporary directory is
    removed and ``target`` is left as it was. Renames within one parent are atomic; the window between the two
    renames leaves the complete old and new directories side by side, never a mix of files. ``durable``: every
    file and the directories are fsynced before the renames, so that a crash of the machine cannot leave the new
    name pointing at unwritten data either; without it the guarantee covers errors and interrupts of the process.
    """
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.halfbyte-tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700); the checkpoint gets a plain mkdir's mode
    try:
        yield tmp
        if target.exists():
            for entry in sorted(os.listdir(target)):
                if not replaced(entry) and not (tmp / entry).exists():
                    _link_or_copy(target / entry, tmp / entry)
        if durable:
            for entry in tmp.rglob("*"):
                if entry.is_file() and not entry.is_symlink():
                    _fsync(entry)
            _fsync(tmp)
        old = target.parent / f".{target.name}.halfbyte-old-{uuid.uuid4().hex[:12]}"
        if target.exists():
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        if durable:
            _fsync(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ShardedReader:
    """Lazy, memory-mapped access to the tensors of a checkpoint directory (single file or index + shards).

    ``stems``: weight file stems to look for, in order of preference (``diffusion_pytorch_model``, ``model``).
    Every shard is opened (header parsed, file mapped) up front, so a missing or truncated file fails before any
    work, naming the file. ``get(key)`` returns a tensor backed by the file's pages (no copy); ``release(key)``
    marks a key done and unmaps a shard once all its keys are done.
    """

    def __init__(self, directory: Path, stems: tuple[str, ...]):
        from safetensors import SafetensorError, safe_open

        self.directory = Path(directory)
        self.file_of: dict[str, str] = {}
        for stem in stems:
            index, single = self.directory / f"{stem}.safetensors.index.json", self.directory / f"{stem}.safetensors"
            if index.is_file():
                self.source = index
                try:
                    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
                self.file_of = dict(weight_map)
                break
            if single.is_file():
                self.source = single
                self.file_of = None  # filled from the header below
                break
        else:
            names = ", ".join(f"{s}.safetensors[.index.json]" for s in stems)
            raise FileNotFoundError(f"{self.directory} holds no safetensors checkpoint (looked for {names}; "
                                    ".bin checkpoints are not read)")
        files = [self.source.name] if self.file_of is None else sorted(set(self.file_of.values()))
        self._handles = {}
        for name in files:
            path = self.directory / name
            if not path.is_file():
                raise FileNotFoundError(f"{self.source} names shard {name}, but {path} does not exist")
            try:
                self._handles[name] = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
        if self.file_of is None:
            self.file_of = dict.fromkeys(self._handles[self.source.name].keys(), self.source.name)
        for name, handle in self._handles.items():
            present = set(handle.keys())
            absent = [k for k, f in self.file_of.items() if f == name and k not in present]
            if absent:
                raise ValueError(f"{self.source} places {absent[:3]} in {name}, which does not hold them")
        self._released: set[str] = set()
        self._pending = {name: 0 for name in self._handles}
        for name in self.file_of.values():
            self._pending[name] += 1

    def keys(self) -> list[str]:
        return list(self.file_of)

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def path_of(self, key: str) -> Path:
        return self.directory / self.file_of[key]

    def _slice(self, key: str):
        return self._handles[self.file_of[key]].get_slice(key)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape from the header, without reading data."""
        return tuple(self._slice(key).get_shape())

    def is_floating(self, key: str) -> bool:
        """Whether the stored dtype is a floating-point one, from the header."""
        return self._slice(key).get_dtype() in _FLOAT_DTYPES

    def nbytes(self, key: str, dtype: torch.dtype | None = None) -> int:
        """Bytes of the tensor as stored, or once cast to ``dtype``."""
        numel = 1
        for s in self.shape(key):
            numel *= s
        return numel * (dtype.itemsize if dtype is not None else _DTYPE_SIZES[self._slice(key).get_dtype()])

    def get(self, key: str) -> Tensor:
        """The stored tensor, backed by the mapped file (read-only use; copy before keeping it)."""
        return self._handles[self.file_of[key]].get_tensor(key)

    def release(self, key: str) -> None:
        if key in self._released:
            return
        self._released.add(key)
        name = self.file_of[key]
        self._pending[name] -= 1
        if self._pending[name] == 0:
            self._handles.pop(name, None)  # unmaps once the last tensor viewing it is gone

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "ShardedReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
