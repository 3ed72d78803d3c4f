"""Merging a PEFT LoRA adapter (e.g. the CQIL authors' released adapters) into a model's weights, as
PEFT's `merge_and_unload` does.

An adapter directory holds adapter_config.json and adapter_model.safetensors (or adapter_model.bin) with,
per adapted linear layer, lora_A [r, in] and lora_B [out, r]. Merging adds scaling * B @ A to the
weight, in fp32, rounded once into the weight's dtype, with scaling = lora_alpha / r (lora_alpha /
sqrt(r) with use_rslora).

Which layers PEFT adapts, and with which r and alpha, is decided by the config, and honoured here the
way PEFT's LoRA decides it for a LlamaForCausalLM (module names "model.layers.{l}.{self_attn|mlp}.{x}"):
target_modules (a list: a name or a dotted suffix; a string: a regex matched against the whole name;
"all-linear"; absent: PEFT's LLaMA default q_proj, v_proj), exclude_modules, layers_to_transform with
layers_pattern (list targets only, as in PEFT), rank_pattern and alpha_pattern (per-module r and alpha),
use_rslora. fan_in_fan_out is ignored for these nn.Linear layers, as PEFT ignores it (with a warning).
Options that would make PEFT compute something else than a LoRA delta on the base weights (DoRA, biases,
modules_to_save, base-weight-changing initialisations, ...) are refused by name.

The config is checked against the tensors before any weight changes: the tensors must adapt exactly the
modules the config selects, with the rank the config gives each, finite values, and the base's shapes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import load_safetensors, load_torch_tensors, read_json

SUPPORTED_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
_BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
LLAMA_DEFAULT_TARGETS = ["q_proj", "v_proj"]  # PEFT's target_modules for model_type "llama" when none given
_KEY = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")

# Options of PEFT's LoraConfig under which merge_and_unload is not "weight + scaling * B @ A": refused when
# set to anything but the value given here (None: unset, False, or empty).
_REFUSED = {"use_dora": False, "bias": "none", "lora_bias": False, "modules_to_save": None,
            "target_parameters": None, "layer_replication": None, "use_qalora": False,
            "trainable_token_indices": None, "alora_invocation_tokens": None, "megatron_config": None}
# init_lora_weights values that change the base weights when the adapter is created (so the adapter's
# tensors only make sense on a base that was changed the same way).
_BASE_CHANGING_INITS = re.compile(r"(pissa.*|olora|corda|loftq)$")


@dataclass(frozen=True)
class AdapterConfig:
    """What decides the merge, read from adapter_config.json and checked."""

    r: int
    alpha: float
    targets: list[str] | str
    exclude: list[str] | str | None
    layers: list[int] | int | None
    layers_pattern: list[str] | None
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    rslora: bool

    def selects(self, key: str) -> bool:
        """Whether PEFT's LoRA adapts the module `key` (peft.tuners.tuners_utils.check_target_module_exists)."""
        if self.exclude:
            if isinstance(self.exclude, str):
                if re.fullmatch(self.exclude, key):
                    return False
            elif key in self.exclude or any(key.endswith(f".{x}") for x in self.exclude):
                return False
        if isinstance(self.targets, str):
            return re.fullmatch(self.targets, key) is not None
        if key in self.targets:
            return True
        if not any(key.endswith(f".{t}") for t in self.targets):
            return False
        if self.layers is None or self.layers == []:
            return True
        if not self.layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            match = next((m for p in self.layers_pattern
                          if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key))), None)
        if match is None:
            return False
        index = int(match.group("idx"))
        return index == self.layers if isinstance(self.layers, int) else index in self.layers

    def rank_and_scaling(self, key: str) -> tuple[int, float]:
        """(r, scaling) of module `key`: rank_pattern / alpha_pattern where a pattern matches the end of
        the name (peft.utils.other.get_pattern_key), else r / lora_alpha."""
        r = next((v for p, v in self.rank_pattern.items() if re.match(rf"(.*\.)?({p})$", key)), self.r)
        alpha = next((v for p, v in self.alpha_pattern.items() if re.match(rf"(.*\.)?({p})$", key)), self.alpha)
        return r, alpha / math.sqrt(r) if self.rslora else alpha / r


def _module_key(layer: int, name: str) -> str:
    return f"model.layers.{layer}.{_BLOCK[name]}.{name}"


def _check_config(config: dict, path: Path) -> AdapterConfig:
    def bad(key, why):
        return ValueError(f"{path / 'adapter_config.json'}: {key} {why}, got {config.get(key)!r}")

    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    for option, default in _REFUSED.items():
        value = config.get(option)
        if value not in (default, None) and not (default is None and value in ([], {}, "", False)):
            raise ValueError(f"{path}: {option}={value!r} is not supported (merging it is not a LoRA delta on "
                             f"the base weights)")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and _BASE_CHANGING_INITS.match(init):
        raise ValueError(f"{path}: init_lora_weights={init!r} changes the base weights when the adapter is made, "
                         f"so the adapter does not apply to the original base; convert it to a plain LoRA "
                         f"adapter first (PEFT's path_initial_model_for_weight_conversion)")
    r = config.get("r", 8)  # PEFT's LoraConfig defaults
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise bad("r", "must be an int >= 1")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise bad("lora_alpha", "must be a finite number")
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise bad("use_rslora", "must be true or false")

    targets = config.get("target_modules")
    if targets is None:
        targets = LLAMA_DEFAULT_TARGETS
    elif targets == "all-linear":
        targets = sorted(SUPPORTED_TARGETS)
    elif isinstance(targets, list):
        if not all(isinstance(t, str) and t for t in targets):
            raise bad("target_modules", "must be a list of module names or a regex string")
        unsupported = sorted({t.rsplit(".", 1)[-1] for t in targets} - SUPPORTED_TARGETS)
        if unsupported:
            raise ValueError(f"{path}: target_modules {unsupported} are not supported "
                             f"(supported: {sorted(SUPPORTED_TARGETS)})")
    elif isinstance(targets, str):
        _check_regex(targets, "target_modules", path)
        others = [k for k in ("lm_head", "model.embed_tokens", "model.norm") if re.fullmatch(targets, k)]
        if others:
            raise ValueError(f"{path}: target_modules {targets!r} selects {others[0]}, which is not supported "
                             f"(supported: {sorted(SUPPORTED_TARGETS)})")
    else:
        raise bad("target_modules", "must be a list of module names or a regex string")
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str):
        _check_regex(exclude, "exclude_modules", path)
    elif exclude is not None and not (isinstance(exclude, list) and all(isinstance(x, str) for x in exclude)):
        raise bad("exclude_modules", "must be a list of module names or a regex string")

    layers, pattern = config.get("layers_to_transform"), config.get("layers_pattern")
    if layers is not None:
        if isinstance(targets, str):
            raise ValueError(f"{path}: layers_to_transform cannot be used with a regex target_modules (PEFT "
                             f"refuses it too)")
        ok_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
        if not (ok_int(layers) or (isinstance(layers, list) and all(ok_int(v) for v in layers))):
            raise bad("layers_to_transform", "must be a layer index or a list of them")
    if pattern is not None:
        pattern = [pattern] if isinstance(pattern, str) else pattern
        if not (isinstance(pattern, list) and all(isinstance(p, str) for p in pattern)):
            raise bad("layers_pattern", "must be a string or a list of strings")
        for p in pattern:
            _check_regex(p, "layers_pattern", path)
        if pattern and layers is None:
            raise ValueError(f"{path}: layers_pattern needs layers_to_transform (PEFT refuses it too)")

    patterns = {}
    for key, kind in (("rank_pattern", int), ("alpha_pattern", float)):
        value = config.get(key) or {}
        if not isinstance(value, dict):
            raise bad(key, "must be an object {module pattern: value}")
        for p, v in value.items():
            _check_regex(p, key, path)
            valid = (isinstance(v, int) and v >= 1) if kind is int else (
                isinstance(v, (int, float)) and math.isfinite(v))
            if isinstance(v, bool) or not valid:
                raise ValueError(f"{path}: {key}[{p!r}] must be {'an int >= 1' if kind is int else 'a finite number'}"
                                 f", got {v!r}")
        patterns[key] = value
    return AdapterConfig(r, float(alpha), targets, exclude, layers, pattern, patterns["rank_pattern"],
                         {p: float(v) for p, v in patterns["alpha_pattern"].items()}, rslora)


def _check_regex(pattern: str, key: str, path: Path) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{path}: {key} {pattern!r} is not a valid regular expression ({e})") from None


def read_adapter(adapter_dir) -> tuple[AdapterConfig, dict[tuple[int, str], dict[str, torch.Tensor]]]:
    """(the checked config, {(layer, module name): {"A": lora_A, "B": lora_B}}) of a PEFT LoRA adapter
    directory. ValueError naming the problem for anything merge would get wrong."""
    path = Path(adapter_dir)
    if not (path / "adapter_config.json").exists():
        raise FileNotFoundError(f"{path}: no adapter_config.json (expected a PEFT LoRA adapter directory)")
    config = _check_config(read_json(path / "adapter_config.json", "adapter config"), path)
    if (path / "adapter_model.safetensors").exists():
        tensors = load_safetensors(path / "adapter_model.safetensors")
    elif (path / "adapter_model.bin").exists():
        tensors = load_torch_tensors(path / "adapter_model.bin", "adapter file", mmap=False)
    else:
        raise FileNotFoundError(f"{path}: no adapter_model.safetensors or adapter_model.bin")
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.search(key)
        if match is None:
            raise ValueError(f"{path}: tensor {key!r} is not a LoRA weight of a LLaMA layer")
        layer, block, name, which = match.groups()
        if name not in SUPPORTED_TARGETS or _BLOCK[name] != block:
            raise ValueError(f"{path}: {key!r} adapts {block}.{name}, which is not supported")
        slot = pairs.setdefault((int(layer), name), {})
        if which in slot:
            raise ValueError(f"{path}: two lora_{which} tensors for layer {layer} {name}")
        if tensor.dim() != 2 or not tensor.dtype.is_floating_point:
            raise ValueError(f"{path}: {key!r} must be a 2-D floating-point matrix, got {tensor.dim()}-D "
                             f"{tensor.dtype}")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{path}: {key!r} holds NaN or infinite values")
        slot[which] = tensor
    for (layer, name), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{path}: layer {layer} {name} has lora_{''.join(ab)} without its pair")
        module = _module_key(layer, name)
        if not config.selects(module):
            raise ValueError(f"{path}: the adapter has tensors for {module}, which its adapter_config.json does "
                             f"not select (target_modules {config.targets!r}, layers_to_transform "
                             f"{config.layers!r}, exclude_modules {config.exclude!r}); PEFT would not apply them")
        r, _ = config.rank_and_scaling(module)
        if ab["A"].shape[0] != r or ab["B"].shape[1] != r:
            raise ValueError(f"{path}: {module}: lora_A {tuple(ab['A'].shape)} and lora_B {tuple(ab['B'].shape)} "
                             f"must have rank r = {r} (adapter_config.json)")
    return config, pairs


@torch.no_grad()
def merge_lora(model, adapter_dir, take=None) -> int:
    """Add the adapter's deltas to `model`'s weights in place. Returns the number of weights changed.

    take: (name, tensor) -> the part of a full weight this process holds (a tensor-parallel rank's shard),
    applied to each delta. Raises ValueError (before changing anything) when the adapter does not fit the
    model or its config (read_adapter), or when the config selects a module the adapter has no tensors for.
    """
    config, pairs = read_adapter(adapter_dir)
    n_layers = len(model.layers)
    beyond = sorted(layer for layer, _ in pairs if layer >= n_layers)
    if beyond:
        raise ValueError(f"{adapter_dir}: adapts layer {beyond[0]}, the model has {n_layers} layers")
    selected = [(layer, name) for layer in range(n_layers) for name in sorted(SUPPORTED_TARGETS)
                if config.selects(_module_key(layer, name))]
    lacking = [key for key in selected if key not in pairs]
    if lacking:
        layer, name = lacking[0]
        raise ValueError(f"{adapter_dir}: adapter_config.json selects {_module_key(layer, name)} "
                         f"({len(lacking)} module(s) in all), but the adapter has no tensors for it")
    deltas = []
    for (layer, name), ab in sorted(pairs.items()):
        if model.held_layers is not None and layer not in model.held_layers:
            continue  # another rank holds this layer (parallel/)
        weight = getattr(getattr(model.layers[layer], _BLOCK[name]), name).weight
        _, scaling = config.rank_and_scaling(_module_key(layer, name))
        delta = ab["B"].float() @ ab["A"].float() * scaling
        if take is not None:
            delta = take(f"layers.{layer}.{_BLOCK[name]}.{name}.weight", delta)
        if delta.shape != weight.shape:
            raise ValueError(f"{adapter_dir}: layer {layer} {name}: the adapter's delta is "
                             f"{tuple(delta.shape)}, the weight {tuple(weight.shape)}: an adapter for "
                             f"another base model")
        deltas.append((weight, delta))
    for weight, delta in deltas:  # all checked: now change the weights
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
    return len(deltas)
