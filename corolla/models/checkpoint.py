"""Reading checkpoints: a local folder or a Hugging Face Hub repo id, config and only the needed tensors.

`Checkpoint(model_ref, revision=, token=, cache_dir=, local_files_only=)` resolves files lazily:

- a reference that is an existing folder is read in place (`revision`/`token` are ignored);
- anything else is a Hub repo id, fetched file by file with `huggingface_hub.hf_hub_download`, which
  uses and fills the normal HF cache. huggingface_hub reads `HF_HOME`/`HF_HUB_CACHE`/`HF_HUB_OFFLINE`
  once, at import; this module re-reads them at call time (when `cache_dir`/`local_files_only` are not
  given) and passes them on as `cache_dir=`/`local_files_only=`, so setting them later still works.

Weights: the tensor -> shard map comes from `model.safetensors.index.json`, or from the header of a
single `model.safetensors`. `load_tensors` downloads only the shards that hold the requested tensors
and reads only those tensors (`safe_open` + `get_tensor` per name), with a tqdm bar on stderr, casting
floating-point tensors to the target dtype.

Model identity helpers used for DHT records: `config_hash` (sha256 of the canonical JSON of
`config.to_dict()` without volatile keys: any key starting with `_`, `transformers_version`,
`dtype`/`torch_dtype`, `use_cache` and the runtime output switches; `architectures` is kept) and
`default_dht_prefix` (the last component of the repo id or folder, "." replaced by "-" because "."
separates block indices in DHT keys).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import defaultdict
from functools import cached_property
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import AutoConfig, PretrainedConfig

from corolla.models.errors import CheckpointError


def is_gguf_ref(model_ref: str) -> bool:
    """Whether a model reference names a GGUF file (a path, or ORG/REPO/FILE.gguf on the Hub)."""
    return str(model_ref).lower().endswith(".gguf")


INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

VOLATILE_CONFIG_KEYS = frozenset(
    {
        "transformers_version",
        "torch_dtype",
        "dtype",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)


def _strip_volatile(value):
    if isinstance(value, dict):
        return {
            key: _strip_volatile(item)
            for key, item in value.items()
            if key not in VOLATILE_CONFIG_KEYS and not str(key).startswith("_")
        }
    if isinstance(value, (list, tuple)):
        return [_strip_volatile(item) for item in value]
    return value


def config_hash(config: PretrainedConfig | dict) -> str:
    """sha256 hex of the config's canonical JSON, without volatile keys (see module docstring)."""
    data = config if isinstance(config, dict) else config.to_dict()
    canonical = json.dumps(_strip_volatile(data), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def default_dht_prefix(model_ref: str) -> str:
    """'org/Llama-3.1-8B' -> 'Llama-3-1-8B'; '/models/tiny.llama/' -> 'tiny-llama'."""
    name = str(model_ref).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    if not name:
        raise ValueError(f"cannot derive a DHT prefix from model reference {model_ref!r}")
    return name.replace(".", "-")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> str | None:
    """The HF hub cache named by the environment now (HF_HUB_CACHE, else HF_HOME/hub), or None."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None


def hub_offline() -> bool:
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def _looks_like_path(model_ref: str) -> bool:
    return model_ref.startswith(("/", ".", "~")) or model_ref.count("/") > 1 or "\\" in model_ref


class Checkpoint:
    """A model reference (folder or Hub repo id) whose files, config and tensors are read on demand.

    A reference ending in ``.gguf`` gives a :class:`corolla.models.gguf.GGUFCheckpoint` instead, which offers
    the same reading API over a GGUF file."""

    def __new__(cls, model_ref: str, **kwargs):
        if cls is Checkpoint and is_gguf_ref(model_ref):
            from corolla.models.gguf import GGUFCheckpoint

            return GGUFCheckpoint(model_ref, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        model_ref: str,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
    ):
        self.model_ref = str(model_ref)
        self.revision = revision
        self.token = token
        self.cache_dir = cache_dir
        self.local_files_only = local_files_only
        self.is_local = Path(self.model_ref).expanduser().is_dir()
        self._stored: dict[str, str] = {}  # our name -> name in the files, where they differ (see use_prefix)
        if not self.is_local and _looks_like_path(self.model_ref):
            raise CheckpointError(f"checkpoint folder {self.model_ref!r} does not exist")

    def _find(self, filename: str) -> Path | None:
        """The local path of `filename`, downloading it if needed; None if the checkpoint has no such file."""
        if self.is_local:
            path = Path(self.model_ref).expanduser() / filename
            return path if path.is_file() else None
        offline = self.local_files_only if self.local_files_only is not None else hub_offline()
        try:
            return Path(
                hf_hub_download(
                    self.model_ref,
                    filename,
                    revision=self.revision,
                    token=self.token,
                    cache_dir=self.cache_dir if self.cache_dir is not None else hub_cache_dir(),
                    local_files_only=offline,
                )
            )
        except EntryNotFoundError:
            return None

    def _where(self) -> str:
        if self.is_local:
            return f"folder {self.model_ref!r}"
        offline = self.local_files_only if self.local_files_only is not None else hub_offline()
        hint = " (offline: looked only in the local HF cache)" if offline else ""
        return f"Hub repo {self.model_ref!r} at revision {self.revision or 'main'}{hint}"

    def file(self, filename: str) -> Path:
        path = self._find(filename)
        if path is None:
            raise CheckpointError(f"{filename} not found in {self._where()}")
        return path

    @cached_property
    def raw_config(self) -> dict:
        """config.json as a dict, read without transformers (to check `model_type` first)."""
        return json.loads(self.file(CONFIG_FILE).read_text())

    @cached_property
    def config(self) -> PretrainedConfig:
        return AutoConfig.from_pretrained(self.file(CONFIG_FILE).parent)

    @cached_property
    def weight_map(self) -> dict[str, str]:
        """HF tensor name -> file name of the shard that holds it."""
        index = self._find(INDEX_FILE)
        if index is not None:
            return dict(json.loads(index.read_text())["weight_map"])
        single = self._find(SINGLE_FILE)
        if single is None:
            raise CheckpointError(f"neither {INDEX_FILE} nor {SINGLE_FILE} found in {self._where()}")
        with safe_open(single, framework="pt") as reader:
            return dict.fromkeys(reader.keys(), SINGLE_FILE)

    def use_prefix(self, prefix: str) -> None:
        """Read a checkpoint saved from the bare base model (BLOOM's Hub checkpoints: `h.0...`,
        `word_embeddings...`) under the causal-LM names (`transformer.h.0...`): when no tensor name starts
        with `prefix`, every name except `lm_head.*` is seen with `prefix` prepended."""
        names = self.weight_map
        if not prefix or any(name.startswith(prefix) for name in names):
            return
        self._stored = {(name if name.startswith("lm_head.") else prefix + name): name for name in names}
        self.weight_map = {ours: names[stored] for ours, stored in self._stored.items()}

    def load_tensors(
        self, names: list[str], *, dtype: torch.dtype, device="cpu", progress: bool = True
    ) -> dict[str, torch.Tensor]:
        """Read exactly `names`, fetching only their shards; floating tensors are cast to `dtype`."""
        missing = [name for name in names if name not in self.weight_map]
        if missing:
            raise CheckpointError(f"tensors missing from checkpoint {self.model_ref!r}: {', '.join(missing)}")
        by_shard: dict[str, list[str]] = defaultdict(list)
        for name in names:
            by_shard[self.weight_map[name]].append(name)
        tensors: dict[str, torch.Tensor] = {}
        bar = tqdm(
            total=len(names),
            unit="tensor",
            desc=f"Loading {self.model_ref}",
            file=sys.stderr,
            disable=not progress,
        )
        with bar:
            for shard, shard_names in by_shard.items():
                with safe_open(self.file(shard), framework="pt") as reader:
                    for name in shard_names:
                        tensor = reader.get_tensor(self._stored.get(name, name))
                        cast = dtype if tensor.is_floating_point() else tensor.dtype
                        # copy=True: never keep a view of safetensors' mmap, which would keep the shard's
                        # pages resident (and counted) next to our own copies of fused weights
                        tensors[name] = tensor.to(device=device, dtype=cast, copy=True)
                        bar.update(1)
        return tensors
