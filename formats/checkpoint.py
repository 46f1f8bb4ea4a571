"""Hugging Face checkpoints: a folder with config.json and safetensors weights (one file or shards with an
index), or a hub repo id fetched with huggingface_hub. Tensors come out one at a time, as float32 or in their
stored 16-bit form, so a whole model is never in memory.

Opening a folder checks it before anything is planned: config.json's values and every tensor's shape and dtype
against the architecture record (qtool/archs.py), shard paths and weights links inside the folder, every file
regular (a FIFO would block) and every JSON file bounded in size and depth.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from qtool import archs
from qtool.errors import QtoolError
from qtool.formats.safetensors import SafetensorsFile, read_json

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# what a conversion needs from a hub repo; weights are safetensors only
HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json", "chat_template.jinja"]
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")  # F64, rare, is narrowed to F32 when read
MAX_CONFIG_BYTES = 16 << 20  # config.json and the shard index are a few KB; a bigger one is not a checkpoint


def resolve_source(src: str) -> Path:
    """A local folder as is; otherwise a hub repo id, downloaded (or found in the cache when offline)."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise QtoolError(f"{src}: expected a checkpoint folder (config.json + safetensors) or a .gguf file")
        return path
    if not REPO_ID.match(src):
        raise QtoolError(f"{src}: no such file or folder, and not a Hugging Face repo id (org/name)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - a dependency
        raise QtoolError("huggingface_hub is not installed") from None
    try:
        return Path(snapshot_download(src, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:
        raise QtoolError(f"{src}: not in the local Hugging Face cache and the hub cannot be reached "
                         "(HF_HUB_OFFLINE is set or there is no network)") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QtoolError(f"{src}: download failed: {first}") from None


def _weight_map(idx: Path, index: object) -> dict[str, str]:
    """model.safetensors.index.json's weight_map: tensor name → shard file, a plain name inside the folder
    (an absolute path or "../" would read any file the user can read)."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in weight_map.items()):
        raise QtoolError(f"{idx}: weight_map is not an object of tensor name → shard file name")
    for shard in sorted(set(weight_map.values())):
        parts = Path(shard).parts
        if not shard or Path(shard).is_absolute() or ".." in parts or "\0" in shard:
            raise QtoolError(f"{idx}: weight_map: shard path {shard!r} is not inside the model folder")
    return weight_map


def _check_inside(folder: Path, path: Path) -> None:
    """A weights, config or tokenizer file must resolve inside the model folder: a symlink out of it is followed
    only as a hub cache snapshot links into its own blob store
    (models--org--name/snapshots/<rev>/f → models--org--name/blobs/<hash>)."""
    try:
        root, target = folder.resolve(), path.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise QtoolError(f"{path}: cannot be resolved ({getattr(e, 'strerror', None) or e})") from None
    if target.is_relative_to(root):
        return
    snapshot = folder.absolute()
    if snapshot.parent.name == "snapshots" and snapshot.parent.parent.name.startswith("models--"):
        if target.is_relative_to((snapshot.parent.parent / "blobs").resolve()):
            return
    raise QtoolError(f"{path}: links outside the model folder (to {target}); copy the file in to use it")


class Checkpoint:
    """A checkpoint folder. `names` lists every tensor; `stored(name)` gives its stored values, `release(name)`
    drops the file pages they touched."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        cfg = self.folder / "config.json"
        if not cfg.exists() and not cfg.is_symlink():  # a broken link is reported as such by read_json
            raise QtoolError(f"{self.folder}: no config.json, not a Hugging Face checkpoint folder")
        # every metadata file a conversion reads (here, in hf_metadata and hf_tokenizer), checked once before any
        for name in HUB_PATTERNS:
            if "*" not in name and ((p := self.folder / name).exists() or p.is_symlink()):
                _check_inside(self.folder, p)
        self.config = read_json(cfg, MAX_CONFIG_BYTES)
        if not isinstance(self.config, dict):
            raise QtoolError(f"{cfg}: not a JSON object")
        self._files: dict[str, SafetensorsFile] = {}
        try:
            self._where = self._index()
            # before anything is planned: a config that contradicts itself or its tensors is an error, not a file
            try:
                self.arch = archs.check_checkpoint(self.config, {n: self.shape(n) for n in self._where})
            except QtoolError as e:
                raise QtoolError(f"{self.folder}: {e}") from None
            for name, shard in self._where.items():  # refused now, not halfway through writing
                dtype = self.dtype(name)
                if dtype not in FLOAT_DTYPES and archs.hf_tensor_kind(name, self.arch) is not None:
                    raise QtoolError(f"{self.folder / shard}: tensor {name} has dtype {dtype}; qtool converts "
                                     "F32, F16 and BF16 weights")
        except BaseException:
            self.close()
            raise

    def _index(self) -> dict[str, str]:
        idx = self.folder / "model.safetensors.index.json"
        if idx.exists():
            weight_map = _weight_map(idx, read_json(idx, MAX_CONFIG_BYTES))
            where = {}
            for shard in sorted(set(weight_map.values())):
                f = self._open(shard)
                for name in f.tensors:
                    where[name] = shard
            missing = sorted(set(weight_map) - set(where))
            if missing:
                raise QtoolError(f"{idx}: tensor {missing[0]} is not in its shard {weight_map[missing[0]]}")
            return where
        files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in self.folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise QtoolError(f"{self.folder}: only pickle weights ({pickles[0]}); qtool refuses to unpickle "
                                 "them because loading a pickle can run arbitrary code. Convert them to safetensors "
                                 "(e.g. transformers' save_pretrained(safe_serialization=True)) or use the "
                                 "repo's safetensors files")
            raise QtoolError(f"{self.folder}: no .safetensors weights found")
        where = {}
        for fname in files:
            for name in self._open(fname).tensors:
                if name in where:
                    raise QtoolError(f"{self.folder}: tensor {name} appears in both {where[name]} and {fname}")
                where[name] = fname
        return where

    def _open(self, fname: str) -> SafetensorsFile:
        if fname not in self._files:
            path = self.folder / fname
            if not path.exists():
                raise QtoolError(f"{self.folder}: weights file {fname} is missing")
            _check_inside(self.folder, path)
            self._files[fname] = SafetensorsFile(path)
        return self._files[fname]

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._files[self._where[name]].tensors[name].shape

    def dtype(self, name: str) -> str:
        return self._files[self._where[name]].tensors[name].dtype

    def nbytes(self, name: str) -> int:
        t = self._files[self._where[name]].tensors[name]
        return t.end - t.begin

    def stored(self, name: str) -> tuple[np.ndarray, str]:
        """The tensor as stored, zero-copy (BF16 as uint16 bits), and its dtype "F32", "F16" or "BF16"
        (F64, rare, is narrowed to F32 here)."""
        f = self._files[self._where[name]]
        dtype = f.tensors[name].dtype
        if dtype == "F64":
            return f.view(name).astype(np.float32), "F32"
        return f.view(name), dtype  # one of FLOAT_DTYPES: checked when the folder was opened

    def release(self, name: str) -> None:
        """Drop the pages of a tensor that has been encoded from this process's resident set."""
        self._files[self._where[name]].release(name)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
