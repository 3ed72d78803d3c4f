"""Configuration: the CQIL grouping (`CQILConfig`) and the LLaMA hyper-parameters (`LlamaArgs`).

CQILConfig speaks the authors' config.json dialect too: `cqil_layers` (a list of groups) and `d` (the
bypass distance), so their configs and LoRA adapters keep their meaning here.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .files import atomic_write_text, read_json

BYPASS_MODES = ("residual", "mlp_input")


@dataclass(frozen=True)
class CQILConfig:
    """Which runs of adjacent layers read the same input and run concurrently.

    groups: lists of consecutive layer indices, e.g. [[12, 13], [14, 15]]. Layers outside every group run
        sequentially as usual; a group of one layer is an ordinary layer; no groups is the original model.
    bypass: d >= 0. Layer j of a group also receives the attention outputs of the d layers before it in
        the same group (0: no bypass).
    bypass_mode: "residual" (default; what the authors' code computes: the bypassed attention outputs are
        added to layer j's residual stream) or "mlp_input" (the paper's description: they only inform
        layer j's MLP input). docs/design.md has the equations.
    """

    groups: tuple[tuple[int, ...], ...] = ()
    bypass: int = 0
    bypass_mode: str = "residual"

    def __init__(self, groups=(), bypass: int = 0, bypass_mode: str = "residual"):
        object.__setattr__(self, "groups", _normalise_groups(groups))
        if isinstance(bypass, bool) or not isinstance(bypass, int):
            raise TypeError(f"bypass must be an int >= 0, got {bypass!r}")
        if bypass < 0:
            raise ValueError(f"bypass (d) must be >= 0, got {bypass}")
        if bypass_mode not in BYPASS_MODES:
            raise ValueError(f"bypass_mode must be one of {BYPASS_MODES}, got {bypass_mode!r}")
        object.__setattr__(self, "bypass", bypass)
        object.__setattr__(self, "bypass_mode", bypass_mode)
        self._check_structure()

    # ----------------------------------------------------------------------------------------------
    # Constructors

    @classmethod
    def from_range(
        cls, start: int, end: int, parallel: int, bypass: int = 0, bypass_mode: str = "residual"
    ) -> CQILConfig:
        """Groups of `parallel` consecutive layers covering [start, end).

        The paper's "S12-E30-P2" is `from_range(12, 30, 2)`. When end - start is not a multiple of
        `parallel`, the last group is shorter (e.g. from_range(12, 17, 2) gives [12,13], [14,15], [16]),
        and a tail of one layer is simply an ordinary layer.
        """
        for name, value in (("start", start), ("end", end), ("parallel", parallel)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if start < 0 or end <= start:
            raise ValueError(f"from_range needs 0 <= start < end, got start={start}, end={end}")
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {parallel}")
        groups = [list(range(s, min(s + parallel, end))) for s in range(start, end, parallel)]
        return cls(groups=groups, bypass=bypass, bypass_mode=bypass_mode)

    @classmethod
    def from_hf_config(cls, src: Mapping[str, Any] | str | os.PathLike) -> CQILConfig | None:
        """Read the authors' keys from a config.json: `cqil_layers` (groups) and `d` (bypass).

        src: a dict, a path to a config.json, or a directory holding one. Returns None when the config
        has no `cqil_layers` key. Our own key `cqil_bypass_mode` is honoured when present.
        """
        data = _read_json_source(src)
        if "cqil_layers" not in data:
            return None
        return cls(
            groups=data["cqil_layers"] or (),
            bypass=data.get("d", 0),
            bypass_mode=data.get("cqil_bypass_mode", "residual"),
        )

    # ----------------------------------------------------------------------------------------------
    # Serialisation: our JSON file uses the authors' keys, so it can be merged into a config.json.

    def to_dict(self) -> dict[str, Any]:
        return {
            "cqil_layers": [list(g) for g in self.groups],
            "d": self.bypass,
            "cqil_bypass_mode": self.bypass_mode,
        }

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> CQILConfig:
        config = cls.from_hf_config(path)
        if config is None:
            raise ValueError(f"{path}: no 'cqil_layers' key, so it does not describe a CQIL grouping")
        return config

    # ----------------------------------------------------------------------------------------------

    def validate(self, num_layers: int) -> None:
        """Check the groups against a model of `num_layers` layers; raise ValueError naming the group."""
        for group in self.groups:
            bad = [i for i in group if i >= num_layers]
            if bad:
                raise ValueError(
                    f"group {list(group)}: layer index {bad[0]} is outside the model "
                    f"(it has {num_layers} layers, indices 0..{num_layers - 1})"
                )

    def stages(self, num_layers: int) -> list[tuple[int, ...]]:
        """The model's execution order: each stage is a group or a single ungrouped layer.

        E.g. 6 layers with groups [[2, 3]] -> [(0,), (1,), (2, 3), (4,), (5,)].
        """
        self.validate(num_layers)
        group_of = {g[0]: g for g in self.groups}
        stages, layer = [], 0
        while layer < num_layers:
            stage = group_of.get(layer, (layer,))
            stages.append(stage)
            layer += len(stage)
        return stages

    @property
    def layers_saved(self) -> int:
        """Sequential layer steps removed: a group of P layers costs one step instead of P."""
        return sum(len(g) - 1 for g in self.groups)

    def _check_structure(self) -> None:
        seen: dict[int, tuple[int, ...]] = {}
        for group in self.groups:
            if any(b != a + 1 for a, b in zip(group, group[1:])):
                raise ValueError(
                    f"group {list(group)} is not a run of consecutive layer indices in increasing "
                    f"order (e.g. [12, 13, 14])"
                )
            for i in group:
                if i in seen:
                    raise ValueError(
                        f"groups {list(seen[i])} and {list(group)} overlap at layer {i}: "
                        f"a layer can belong to one group only"
                    )
                seen[i] = group

    def __repr__(self) -> str:
        return (
            f"CQILConfig(groups={[list(g) for g in self.groups]}, bypass={self.bypass}, "
            f"bypass_mode={self.bypass_mode!r})"
        )


def _normalise_groups(groups) -> tuple[tuple[int, ...], ...]:
    if isinstance(groups, (str, bytes)) or not hasattr(groups, "__iter__"):
        raise TypeError(f"groups must be a list of lists of layer indices, got {groups!r}")
    out = []
    for group in groups:
        if isinstance(group, (str, bytes)) or not hasattr(group, "__iter__"):
            raise TypeError(f"each group must be a list of layer indices, got {group!r}")
        group = tuple(group)
        if not group:
            raise ValueError("empty group []: a group needs at least one layer index")
        for i in group:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"group {list(group)}: layer indices must be ints, got {i!r}")
            if i < 0:
                raise ValueError(f"group {list(group)}: layer index {i} is negative")
        out.append(group)
    return tuple(sorted(out))


def _read_json_source(src: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    if isinstance(src, Mapping):
        return dict(src)
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"expected a dict or the path of a JSON file, got {type(src).__name__}")
    path = Path(src)
    if path.is_dir():
        path = path / "config.json"
    return read_json(path, "config file")

# --------------------------------------------------------------------------------------------------
# LLaMA hyper-parameters


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class LlamaArgs:
    """The hyper-parameters of a LLaMA-family model (the subset of transformers' LlamaConfig we use)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"model config: {name} must be a positive int, got {value!r}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not _positive_number(value):
                raise ValueError(f"model config: {name} must be a finite number > 0, got {value!r}")
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"model config: {name} must be true or false, got {getattr(self, name)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"model config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, tuple) else (value,) if value is not None else ()
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ValueError(f"model config: {name} must be a token id (an int >= 0), a list of them or "
                                 f"null, got {value!r}")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)

    @classmethod
    def from_hf(cls, config: Mapping[str, Any] | Any, source: str | os.PathLike | None = None) -> LlamaArgs:
        """From a transformers config object or a config.json dict; ValueError for non-LLaMA models and
        for values that would give garbage (each error names the key, and `source` when given)."""
        try:
            return cls._from_hf(config)
        except ValueError as e:
            if source is None:
                raise
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def _from_hf(cls, config: Mapping[str, Any] | Any) -> LlamaArgs:
        data = dict(config) if isinstance(config, Mapping) else config.to_dict()
        model_type = data.get("model_type")
        archs = data.get("architectures") or []
        if model_type != "llama" and (not isinstance(archs, list) or "LlamaForCausalLM" not in archs):
            raise ValueError(
                f"not a LLaMA checkpoint: model_type={model_type!r}, architectures={archs} "
                f"(cqil_kernels supports model_type 'llama' / LlamaForCausalLM)"
            )
        act = data.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"model config: hidden_act {act!r} is not supported (LLaMA uses 'silu')")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in data]
        if missing:
            raise ValueError(f"model config is missing the key {missing[0]!r}")
        hidden, heads = data["hidden_size"], data["num_attention_heads"]
        for name, value in (("hidden_size", hidden), ("num_attention_heads", heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"model config: {name} must be a positive int, got {value!r}")
        rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
        if not isinstance(rope, Mapping):
            raise ValueError(f"model config: rope_parameters / rope_scaling must be an object, got {rope!r}")
        rope = dict(rope)
        rope_theta = rope.pop("rope_theta", data.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        eos = data.get("eos_token_id")
        # transformers' LlamaConfig: a missing or null num_key_value_heads means one per query head, a
        # missing or null head_dim means hidden_size // num_attention_heads; 0 is an error, not a default.
        kv_heads = data.get("num_key_value_heads")
        head_dim = data.get("head_dim")
        return cls(
            vocab_size=data["vocab_size"],
            hidden_size=hidden,
            intermediate_size=data["intermediate_size"],
            num_hidden_layers=data["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=heads if kv_heads is None else kv_heads,
            head_dim=hidden // heads if head_dim is None else head_dim,
            max_position_embeddings=data.get("max_position_embeddings", 2048),
            rms_norm_eps=_as_float(data.get("rms_norm_eps", 1e-6)),
            rope_theta=_as_float(rope_theta),
            rope_scaling=None if rope_type == "default" else rope,
            tie_word_embeddings=data.get("tie_word_embeddings", False),
            attention_bias=data.get("attention_bias", False),
            mlp_bias=data.get("mlp_bias", False),
            bos_token_id=data.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            extra={k: data[k] for k in ("cqil_layers", "d", "cqil_bypass_mode") if k in data},
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json dict that transformers' LlamaConfig reads back to the same model."""
        rope = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
            else self.eos_token_id,
        }


def _as_float(value):
    """A JSON number as a float; anything else unchanged, for __post_init__ to refuse by name."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _positive_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)


def _check_rope_scaling(scaling) -> None:
    """ValueError unless `scaling` is a rope scaling this package applies, with usable values."""
    if not isinstance(scaling, Mapping):
        raise ValueError(f"model config: rope_scaling must be an object, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"model config: rope scaling type {rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                "original_max_position_embeddings")}.get(rope_type, ())
    for key in needed:
        if not _positive_number(scaling.get(key)):
            raise ValueError(f"model config: rope scaling {rope_type!r} needs {key} as a finite number > 0, "
                             f"got {scaling.get(key)!r}")
    if rope_type == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError(f"model config: rope scaling 'llama3' needs high_freq_factor > low_freq_factor, got "
                         f"{scaling['high_freq_factor']} and {scaling['low_freq_factor']}")
