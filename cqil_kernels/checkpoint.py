"""Loading LLaMA checkpoints into CQILLlama: Hugging Face directories, transformers models, GGUF files.

Every loader yields (name, tensor) pairs one at a time; `_Loader` checks each against the model built
on the "meta" device and moves it to its final device and dtype, so no second full copy of the weights
is ever held.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from .config import CQILConfig, LlamaArgs
from .packing import pack_layers

# Keys some LLaMA checkpoints carry that hold nothing we need (the RoPE table is recomputed).
_IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")


def default_device_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return device, dtype


def resolve_cqil(cqil: Any, checkpoint_keys: Mapping[str, Any]) -> CQILConfig | None:
    """The grouping to use: `cqil` as given, else the checkpoint config's `cqil_layers`/`d` keys."""
    if cqil is None:
        return CQILConfig.from_hf_config(checkpoint_keys) if "cqil_layers" in checkpoint_keys else None
    if isinstance(cqil, CQILConfig):
        return cqil
    if isinstance(cqil, Mapping):
        found = CQILConfig.from_hf_config(cqil)
        if found is None:
            raise ValueError(f"cqil dict has no 'cqil_layers' key: {dict(cqil)}")
        return found
    if isinstance(cqil, (str, os.PathLike)):
        return CQILConfig.load(cqil)
    raise TypeError(f"cqil must be a CQILConfig, a dict, a JSON path or None, got {type(cqil).__name__}")


_LAYER_KEY = re.compile(r"layers\.(\d+)\.")


class _Loader:
    """Fills the parameters of a model built on "meta", one checkpoint tensor at a time.

    model.held_layers (set before loading) limits which layers are read; the others stay on "meta".
    """

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, source: str,
                 pack: bool = True):
        self.model, self.device, self.dtype, self.source = model, device, dtype, source
        held = model.held_layers
        if pack:  # layer weights go straight into the group-contiguous packed tensors (packing.py)
            model.packed_layers = pack_layers(model.layers, device, dtype, copy=False, layer_ids=held)
        self.expected = dict(model.named_parameters())  # tied lm_head is listed once, as embed_tokens
        self.skipped = {name for name in self.expected if not self.wants(name)}
        self.loaded: set[str] = set()

    def wants(self, name: str) -> bool:
        """False for a tensor of a layer this process does not hold (no need to read or convert it)."""
        match = _LAYER_KEY.match(name)
        return self.model.held_layers is None or match is None or int(match.group(1)) in self.model.held_layers

    def put(self, name: str, tensor: torch.Tensor) -> None:
        if _IGNORED_KEYS.match(name) or not self.wants(name):
            return
        if name == "lm_head.weight" and self.model.args.tie_word_embeddings:
            return  # tied to embed_tokens.weight, as transformers does
        target = self.expected.get(name)
        if target is None:
            raise ValueError(f"{self.source}: unexpected tensor {name!r} for a LLaMA model of this config")
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(
                f"{self.source}: tensor {name!r} has shape {tuple(tensor.shape)}, but the model config "
                f"expects {tuple(target.shape)}")
        if not target.is_meta:  # a view of the packed layer tensors
            target.data.copy_(tensor)
        else:
            module_name, _, attr = name.rpartition(".")
            value = tensor.to(device=self.device, dtype=self.dtype)
            setattr(self.model.get_submodule(module_name), attr, nn.Parameter(value, requires_grad=False))
        self.loaded.add(name)

    def finish(self) -> nn.Module:
        missing = [n for n in self.expected if n not in self.loaded and n not in self.skipped]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(f"{self.source}: the checkpoint has no tensor for {shown}")
        model = self.model
        if model.args.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.reset_rope()
        return model.eval()


def _hf_name(key: str) -> str:
    return key[len("model."):] if key.startswith("model.") else key


def load_pretrained(cls, src, cqil=None, device=None, dtype=None, progress: bool = False, lora=None,
                    held_layers=None):
    """See CQILLlama.from_pretrained. held_layers: read only these layers' weights, or a function
    (LlamaArgs, CQILConfig) -> those layers (a rank of a multi-GPU run: parallel/rank.py)."""
    if lora is not None:
        from .lora import read_adapter

        read_adapter(lora)  # a bad adapter is refused before the model is read
        if cqil is None and (Path(lora) / "cqil.json").is_file():
            cqil = Path(lora) / "cqil.json"  # the grouping the adapter was trained for (finetune.py)
    model = _load(cls, src, cqil, device, dtype, progress, copy=lora is not None, held_layers=held_layers)
    if lora is not None:
        from .lora import merge_lora

        merge_lora(model, lora)
    return model


def _load(cls, src, cqil, device, dtype, progress: bool, copy: bool, held_layers=None):
    build = lambda args, cqil: _build(cls, args, cqil, held_layers)  # noqa: E731
    if isinstance(src, nn.Module):
        return _load_transformers_model(build, src, cqil, device, dtype, copy=copy)
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"src must be a directory, a .gguf file or a LlamaForCausalLM, got {type(src).__name__}")
    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint directory or file")
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(build, path, cqil, device, dtype, progress)
    if path.is_dir():
        return _load_hf_dir(build, path, cqil, device, dtype, progress)
    raise ValueError(f"{path}: expected a checkpoint directory (config.json + weights) or a .gguf file")


def _build(cls, args: LlamaArgs, cqil: CQILConfig | None, held_layers=None) -> nn.Module:
    with torch.device("meta"):
        model = cls(args, cqil)  # validates the grouping before any weight is read
    if callable(held_layers):  # e.g. a rank's placement, which depends on the config and grouping
        held_layers = held_layers(args, model.cqil)
    if held_layers is not None:
        bad = [i for i in held_layers if not 0 <= i < args.num_hidden_layers]
        if bad:
            raise ValueError(f"held_layers: layer {bad[0]} is outside the model ({args.num_hidden_layers} layers)")
        model.held_layers = tuple(sorted(set(held_layers)))
    return model


def _progress(items, total: int, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, unit="tensor")


# --------------------------------------------------------------------------------------------------
# transformers model object


def _load_transformers_model(build, hf_model: nn.Module, cqil, device, dtype, copy: bool = False):
    config = getattr(hf_model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError(f"expected a transformers LlamaForCausalLM, got {type(hf_model).__name__}")
    args = LlamaArgs.from_hf(config)
    some = next(hf_model.parameters())
    device = torch.device(device) if device is not None else some.device
    device, dtype = default_device_dtype(device, dtype if dtype is not None else some.dtype)
    model = build(args, resolve_cqil(cqil, args.extra))
    # Not packed: parameters share the transformers model's storage when device and dtype match (the
    # Triton backend packs, i.e. copies, on first use).
    # (copy=True, e.g. to merge a LoRA adapter: packed copies, so the transformers model stays as it was)
    loader = _Loader(model, device, dtype, type(hf_model).__name__, pack=copy)
    for key, tensor in hf_model.state_dict().items():
        loader.put(_hf_name(key), tensor.detach())
    return loader.finish()


# --------------------------------------------------------------------------------------------------
# Hugging Face directory: config.json + safetensors or pytorch_model*.bin (sharded or not)


def _weight_files(path: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{index}: shard {missing[0]} is missing")
            return [path / s for s in shards]
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        files = sorted(path.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"{path}: no weights found (*.safetensors or pytorch_model*.bin)")


def _iter_weight_file(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    else:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        for key in list(state):
            yield key, state.pop(key)


def _load_hf_dir(build, path: Path, cqil, device, dtype, progress: bool):
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    args = LlamaArgs.from_hf(config)
    files = _weight_files(path)
    device, dtype = default_device_dtype(device, dtype)
    model = build(args, resolve_cqil(cqil, args.extra))
    loader = _Loader(model, device, dtype, str(path))
    for file in _progress(files, len(files), progress, "loading shards"):
        for key, tensor in _iter_weight_file(file):
            loader.put(_hf_name(key), tensor)
    return loader.finish()


# --------------------------------------------------------------------------------------------------
# GGUF (llama.cpp): metadata -> LlamaArgs, tensors dequantized one at a time


_GGUF_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _gguf_name(name: str) -> str | None:
    if name in _GGUF_NAMES:
        return _GGUF_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in _GGUF_LAYER_NAMES:
        return f"layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of q/k projection rows (interleaved RoPE pairs -> rotate-half).

    llama.cpp's converter stores, per head, rows (0, h/2, 1, h/2+1, ...) where the checkpoint had
    (0, 1, ..., h-1); this returns the checkpoint order. w: [n_heads * head_dim, ...] (weight or bias).
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_metadata(reader) -> dict[str, Any]:
    """The GGUF key/value metadata as plain Python values (token lists are skipped)."""
    out = {}
    for key, field in reader.fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.scores"):
            continue
        out[key] = field.contents()
    return out


def _gguf_args(meta: Mapping[str, Any], tensor_names: set[str], vocab_rows: int, source: str) -> LlamaArgs:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{source}: GGUF architecture is {arch!r}; cqil_kernels supports 'llama'")
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(f"{source}: GGUF carries per-frequency RoPE factors (rope_freqs.weight, Llama 3.1 "
                         f"style), which this loader does not support yet; load the HF directory instead")

    def need(key):
        if f"llama.{key}" not in meta:
            raise ValueError(f"{source}: GGUF metadata lacks llama.{key}")
        return meta[f"llama.{key}"]

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    rope_scaling = None
    scaling_type = meta.get("llama.rope.scaling.type", "none")
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(meta["llama.rope.scaling.factor"])}
    elif scaling_type != "none":
        raise ValueError(f"{source}: GGUF rope scaling type {scaling_type!r} is not supported")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return LlamaArgs(
        vocab_size=int(meta.get("llama.vocab_size", vocab_rows)),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(meta.get("llama.attention.head_count_kv", heads)),
        head_dim=int(meta.get("llama.attention.key_length", hidden // heads)),
        max_position_embeddings=int(meta.get("llama.context_length", 2048)),
        rms_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        mlp_bias="blk.0.ffn_up.bias" in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=int(eos) if eos is not None else None,
    )


def _load_gguf(build, path: Path, cqil, device, dtype, progress: bool):
    try:
        from gguf import GGUFReader, GGMLQuantizationType
        from gguf.quants import dequantize
    except ImportError:
        raise ImportError("loading .gguf files needs the gguf package: pip install gguf") from None
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct.error/... on a file that is not GGUF
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from None
    names = {t.name for t in reader.tensors}
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ValueError(f"{path}: GGUF has no token_embd.weight tensor")
    args = _gguf_args(gguf_metadata(reader), names, int(embed.shape[-1]), str(path))
    device, dtype = default_device_dtype(device, dtype)
    model = build(args, resolve_cqil(cqil, {}))
    loader = _Loader(model, device, dtype, str(path))
    plain = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
    for t in _progress(reader.tensors, len(reader.tensors), progress, "loading GGUF"):
        name = _gguf_name(t.name)
        if name is None:
            raise ValueError(f"{path}: unexpected GGUF tensor {t.name!r} for a LLaMA model")
        if not loader.wants(name):
            continue
        if t.tensor_type == GGMLQuantizationType.BF16:
            tensor = torch.from_numpy(t.data.copy()).view(torch.bfloat16)
        elif t.tensor_type in plain:
            tensor = torch.from_numpy(t.data.copy())
        else:
            try:
                tensor = torch.from_numpy(dequantize(t.data, t.tensor_type))
            except NotImplementedError:
                raise ValueError(f"{path}: tensor {t.name} uses {t.tensor_type.name}, which the gguf "
                                 f"package cannot dequantize") from None
        tensor = tensor.reshape([int(n) for n in reversed(t.shape)])  # GGML lists dims innermost first
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = unpermute_rope_rows(tensor, args.num_attention_heads)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = unpermute_rope_rows(tensor, args.num_key_value_heads)
        loader.put(name, tensor)
    return loader.finish()
