"""Loading LLaMA checkpoints into CQILLlama: Hugging Face directories, transformers models, GGUF files.

Every loader yields (name, tensor) pairs one at a time; `_Loader` checks each against the model built
on the "meta" device and moves it to its final device and dtype, so no second full copy of the weights
is ever held.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from .config import CQILConfig, LlamaArgs
from .files import (inside, iter_safetensors, load_torch_tensors, read_json, regular_file,
                    safetensors_shapes)
from .packing import check_float_dtype

# Keys some LLaMA checkpoints carry that hold nothing we need (the RoPE table is recomputed).
_IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")


def check_device(device) -> torch.device:
    """`device` as a torch.device, or ValueError naming it when it cannot be used here: an unknown name, a
    CUDA device without a GPU (or beyond the visible ones)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: no CUDA GPU is usable here (torch {torch.__version__}, "
                             f"torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: only {torch.cuda.device_count()} GPU(s) are visible")
    elif device.type not in ("cpu", "meta"):
        raise ValueError(f"device {str(device)!r}: cqil_kernels runs on 'cpu' or 'cuda' devices")
    return device


def default_device_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    device = check_device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    check_float_dtype(dtype)
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

    model.held_layers (its constructor argument) limits which layers are read; the others stay on "meta".
    """

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, source: str,
                 pack: bool = True, take=None):
        self.model, self.device, self.dtype, self.source = model, device, dtype, source
        self.take = take  # (name, tensor) -> the part of it this process holds (a tensor-parallel shard)
        if pack:  # layer weights go straight into the group-contiguous packed tensors (packing.py)
            model.pack(device, dtype, copy=False)
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
        if self.take is not None:
            tensor = self.take(name, tensor)
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
                    held_layers=None, placement=None):
    """See CQILLlama.from_pretrained. held_layers: read only these layers' weights. placement: a function
    (LlamaArgs, CQILConfig) -> the part of the model this process holds (a parallel.Placement, or any
    object with `held_layers`, `layer_args(layer, args)` and `take(name, tensor)`): its layers, built
    with their shard's sizes and filled with their shards."""
    if lora is not None:
        from .lora import read_adapter

        read_adapter(lora)  # a bad adapter is refused before the model is read
        if cqil is None and (Path(lora) / "cqil.json").exists():  # CQILConfig.load refuses a non-regular file
            cqil = Path(lora) / "cqil.json"  # the grouping the adapter was trained for (finetune.py)
    parts = {}

    def build(args, grouping):
        if placement is None:
            with torch.device("meta"):  # validates the grouping before any weight is read
                return cls(args, grouping, held_layers=held_layers)
        part = parts["part"] = placement(args, grouping if grouping is not None else CQILConfig())
        with torch.device("meta"):
            return cls(args, grouping, held_layers=part.held_layers,
                       layer_args=lambda layer: part.layer_args(layer, args))

    take = (lambda name, tensor: parts["part"].take(name, tensor)) if placement is not None else None
    model = _load(build, src, cqil, device, dtype, progress, copy=lora is not None, take=take)
    if lora is not None:
        from .lora import merge_lora

        merge_lora(model, lora, take=take)
    return model


def read_args(src) -> LlamaArgs:
    """The LlamaArgs of a checkpoint path (config.json, or a GGUF file's metadata) without reading weights:
    what a multi-process launcher checks a placement against before it starts any process."""
    path = Path(src)
    if path.is_dir():
        return _hf_dir_args(path)
    return _gguf_reader_args(_gguf_reader(path), path)


def _load(build, src, cqil, device, dtype, progress: bool, copy: bool, take=None):
    if isinstance(src, nn.Module):
        if take is not None:
            raise TypeError("a placement needs a checkpoint path, not a model object")
        return _load_transformers_model(build, src, cqil, device, dtype, copy=copy)
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"src must be a directory, a .gguf file or a LlamaForCausalLM, got {type(src).__name__}")
    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint directory or file")
    if path.is_dir():
        return _load_hf_dir(build, path, cqil, device, dtype, progress, take)
    if path.suffix == ".gguf":
        return _load_gguf(build, path, cqil, device, dtype, progress, take)
    raise ValueError(f"{path}: expected a checkpoint directory (config.json + weights) or a .gguf file")


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
# What a checkpoint must hold, checked from its tensor list before the model is built


def expected_shapes(args: LlamaArgs) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every tensor a checkpoint of this config holds (HF names without "model.");
    lm_head.weight is optional with tied embeddings (transformers saves it or not)."""
    D, F, V = args.hidden_size, args.intermediate_size, args.vocab_size
    q, kv = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    per_layer = {"input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
                 "self_attn.q_proj.weight": (q, D), "self_attn.k_proj.weight": (kv, D),
                 "self_attn.v_proj.weight": (kv, D), "self_attn.o_proj.weight": (D, q),
                 "mlp.gate_proj.weight": (F, D), "mlp.up_proj.weight": (F, D), "mlp.down_proj.weight": (D, F)}
    if args.attention_bias:
        per_layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                          "self_attn.v_proj.bias": (kv,), "self_attn.o_proj.bias": (D,)})
    if args.mlp_bias:
        per_layer.update({"mlp.gate_proj.bias": (F,), "mlp.up_proj.bias": (F,), "mlp.down_proj.bias": (D,)})
    out = {"embed_tokens.weight": (V, D), "norm.weight": (D,), "lm_head.weight": (V, D)}
    for layer in range(args.num_hidden_layers):
        out.update({f"layers.{layer}.{name}": shape for name, shape in per_layer.items()})
    return out


def check_tensor_list(shapes: Mapping[str, tuple[int, ...]], args: LlamaArgs, source: str) -> None:
    """ValueError, before anything is built or allocated, when the checkpoint's tensors (shapes: {name
    without "model.": shape}) are not exactly what the config describes: an unexpected tensor, a shape
    that differs, or a missing one (e.g. a config edited to 100000 layers)."""
    expected = expected_shapes(args)
    for name, shape in shapes.items():
        if _IGNORED_KEYS.match(name):
            continue
        want = expected.get(name)
        if want is None:
            raise ValueError(f"{source}: unexpected tensor {name!r} for a LLaMA model of this config")
        if tuple(shape) != want:
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(shape)}, but the model config "
                             f"expects {want}")
    optional = {"lm_head.weight"} if args.tie_word_embeddings else set()
    missing = [n for n in expected if n not in shapes and n not in optional]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{source}: the checkpoint has no tensor for {shown}")


# --------------------------------------------------------------------------------------------------
# Hugging Face directory: config.json + safetensors or pytorch_model*.bin (sharded or not)


def _weight_files(path: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.exists():
            weight_map = read_json(index, "shard index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index}: the shard index has no weight_map (an object naming each tensor's "
                                 f"file)")
            shards = sorted(set(weight_map.values()), key=str)
            files = [inside(path, shard, "shard") for shard in shards]
            missing = [f for f in files if not f.exists()]
            if missing:
                raise FileNotFoundError(f"{index}: shard {missing[0].name} is missing")
            return [regular_file(f, "shard") for f in files]
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        files = sorted(path.glob(pattern))
        if files:
            return [regular_file(f, "weight file") for f in files]
    raise FileNotFoundError(f"{path}: no weights found (*.safetensors or pytorch_model*.bin)")


def _file_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    if file.suffix == ".safetensors":
        return safetensors_shapes(file)
    return {key: tuple(t.shape) for key, t in load_torch_tensors(file, "weight file").items()}


def _iter_weight_file(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if file.suffix == ".safetensors":
        yield from iter_safetensors(file)
    else:
        state = load_torch_tensors(file, "weight file")
        for key in list(state):
            yield key, state.pop(key)


def _directory_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """{name without "model.": shape} over every weight file; ValueError for a tensor in two files."""
    shapes, where = {}, {}
    for file in files:
        for key, shape in _file_shapes(file).items():
            name = _hf_name(key)
            if name in where:
                raise ValueError(f"{file}: tensor {key!r} is also in {where[name]} (a tensor must be in one "
                                 f"file only)")
            shapes[name], where[name] = shape, file.name
    return shapes


def _hf_dir_args(path: Path) -> LlamaArgs:
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    return LlamaArgs.from_hf(read_json(config_file, "model config"), source=config_file)


def _load_hf_dir(build, path: Path, cqil, device, dtype, progress: bool, take=None):
    args = _hf_dir_args(path)
    files = _weight_files(path)
    check_tensor_list(_directory_shapes(files), args, str(path))
    device, dtype = default_device_dtype(device, dtype)
    model = build(args, resolve_cqil(cqil, args.extra))
    loader = _Loader(model, device, dtype, str(path), take=take)
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

    def number(key, kind, default=None):
        value = meta.get(f"llama.{key}", default) if default is not None else need(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            what = "an integer" if kind is int else "a number"
            raise ValueError(f"{source}: GGUF metadata llama.{key} must be {what}, got {value!r}")
        return kind(value)

    hidden, heads = number("embedding_length", int), number("attention.head_count", int)
    if heads <= 0:
        raise ValueError(f"{source}: GGUF metadata llama.attention.head_count must be > 0, got {heads}")
    rope_scaling = None
    scaling_type = meta.get("llama.rope.scaling.type", "none")
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": number("rope.scaling.factor", float)}
    elif scaling_type != "none":
        raise ValueError(f"{source}: GGUF rope scaling type {scaling_type!r} is not supported")
    tokens = {key: meta.get(f"tokenizer.ggml.{key}") for key in ("bos_token_id", "eos_token_id")}
    try:
        return LlamaArgs(
            vocab_size=number("vocab_size", int, vocab_rows),
            hidden_size=hidden,
            intermediate_size=number("feed_forward_length", int),
            num_hidden_layers=number("block_count", int),
            num_attention_heads=heads,
            num_key_value_heads=number("attention.head_count_kv", int, heads),
            head_dim=number("attention.key_length", int, hidden // heads),
            max_position_embeddings=number("context_length", int, 2048),
            rms_norm_eps=number("attention.layer_norm_rms_epsilon", float, 1e-5),
            rope_theta=number("rope.freq_base", float, 10000.0),
            rope_scaling=rope_scaling,
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            mlp_bias="blk.0.ffn_up.bias" in tensor_names,
            **{key: int(v) if isinstance(v, int) and not isinstance(v, bool) else v for key, v in tokens.items()},
        )
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def _gguf_reader(path: Path):
    """A GGUFReader of a regular file (gguf would block on a FIFO); ValueError naming a file it cannot read."""
    path = regular_file(path, "GGUF file")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ImportError("loading .gguf files needs the gguf package: pip install gguf") from None
    try:
        return GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct.error/... on a file that is not GGUF
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from None


def _gguf_reader_args(reader, path: Path) -> LlamaArgs:
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ValueError(f"{path}: GGUF has no token_embd.weight tensor")
    return _gguf_args(gguf_metadata(reader), {t.name for t in reader.tensors}, int(embed.shape[-1]), str(path))


def _load_gguf(build, path: Path, cqil, device, dtype, progress: bool, take=None):
    reader = _gguf_reader(path)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    args = _gguf_reader_args(reader, path)
    shapes = {}
    for t in reader.tensors:
        name = _gguf_name(t.name)
        if name is None:
            raise ValueError(f"{path}: unexpected GGUF tensor {t.name!r} for a LLaMA model")
        shapes[name] = tuple(int(n) for n in reversed(t.shape))  # GGML lists dims innermost first
    if len(shapes) != len(reader.tensors):
        raise ValueError(f"{path}: a GGUF tensor name appears twice")
    check_tensor_list(shapes, args, str(path))
    device, dtype = default_device_dtype(device, dtype)
    model = build(args, resolve_cqil(cqil, {}))
    loader = _Loader(model, device, dtype, str(path), take=take)
    plain = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
    for t in _progress(reader.tensors, len(reader.tensors), progress, "loading GGUF"):
        name = _gguf_name(t.name)
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
