"""Merging a PEFT LoRA adapter (e.g. the CQIL authors' released adapters) into a model's weights.

An adapter directory holds adapter_config.json (peft_type "LORA", r, lora_alpha, target_modules,
fan_in_fan_out, use_rslora) and adapter_model.safetensors (or adapter_model.bin) with, per adapted
linear layer, lora_A [r, in] and lora_B [out, r]. Merging adds scaling * B @ A to the weight, with
scaling = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), in fp32, rounded once into the weight's
dtype -- what PEFT's merge_and_unload computes.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

SUPPORTED_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
_KEY = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


def read_adapter(adapter_dir) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config, tensors) of a PEFT LoRA adapter directory, checked for what merge supports."""
    path = Path(adapter_dir)
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no adapter_config.json (expected a PEFT LoRA adapter directory)")
    config = json.loads(config_file.read_text())
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    for option, ok in (("use_dora", False), ("bias", "none")):
        if config.get(option, ok) not in (ok, None):
            raise ValueError(f"{path}: {option}={config[option]!r} is not supported")
    if config.get("modules_to_save"):
        raise ValueError(f"{path}: modules_to_save {config['modules_to_save']} (fully trained copies of "
                         f"modules) are not supported, only LoRA deltas")
    targets = config.get("target_modules") or []
    names = set(targets) if isinstance(targets, list) else None  # a regex string is checked per key below
    if names is not None and not names <= SUPPORTED_TARGETS:
        raise ValueError(f"{path}: target_modules {sorted(names - SUPPORTED_TARGETS)} are not supported "
                         f"(supported: {sorted(SUPPORTED_TARGETS)})")
    if (path / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(path / "adapter_model.safetensors"))
    elif (path / "adapter_model.bin").is_file():
        tensors = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{path}: no adapter_model.safetensors or adapter_model.bin")
    return config, tensors


@torch.no_grad()
def merge_lora(model, adapter_dir) -> int:
    """Add the adapter's deltas to `model`'s weights in place. Returns the number of weights changed.

    Raises ValueError (before changing anything) when the adapter targets other modules or was trained
    for another base shape.
    """
    config, tensors = read_adapter(adapter_dir)
    r = int(config["r"])
    alpha = float(config.get("lora_alpha", r))
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    pairs: dict[tuple[int, str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.search(key)
        if match is None:
            raise ValueError(f"{adapter_dir}: tensor {key!r} is not a LoRA weight of a LLaMA layer")
        layer, block, name, which = match.groups()
        if name not in SUPPORTED_TARGETS:
            raise ValueError(f"{adapter_dir}: {key!r} adapts {name!r}, which is not supported")
        pairs.setdefault((int(layer), block, name), {})[which] = tensor
    deltas = []
    for (layer, block, name), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{adapter_dir}: layer {layer} {name} has lora_{''.join(ab)} without its pair")
        if layer >= len(model.layers):
            raise ValueError(f"{adapter_dir}: adapts layer {layer}, the model has {len(model.layers)} layers")
        if model.held_layers is not None and layer not in model.held_layers:
            continue  # another rank holds this layer (parallel/)
        weight = getattr(getattr(model.layers[layer], block), name).weight
        delta = ab["B"].float() @ ab["A"].float() * scaling
        if config.get("fan_in_fan_out"):
            delta = delta.T
        if delta.shape != weight.shape:
            raise ValueError(f"{adapter_dir}: layer {layer} {name}: the adapter's delta is "
                             f"{tuple(delta.shape)}, the weight {tuple(weight.shape)}: an adapter for "
                             f"another base model")
        deltas.append((weight, delta))
    for weight, delta in deltas:  # all checked: now change the weights
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
    return len(deltas)
