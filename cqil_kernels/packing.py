"""Layer weights packed layer-major, so every CQIL group's weights are one contiguous slice.

A group is a run of consecutive layers [l0, l0 + P), so with every layer's q/k/v rows in one tensor
qkv: [L, (H + 2*Hkv)*Dh, D] (and likewise o, gate, up, down, the two norms and any biases), the group's
weights are qkv[l0:l0 + P] — a view, whatever the grouping, with no copy when `model.cqil` changes.
The model's own nn.Linear / RMSNorm parameters are rebound to views of these tensors, so the torch and
Triton backends share one copy of the weights.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import nn

# packed name -> the per-layer parameters concatenated along dim 0, in order
LAYOUT = {
    "qkv": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "qkv_bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "o": ("self_attn.o_proj.weight",),
    "o_bias": ("self_attn.o_proj.bias",),
    "gate": ("mlp.gate_proj.weight",),
    "gate_bias": ("mlp.gate_proj.bias",),
    "up": ("mlp.up_proj.weight",),
    "up_bias": ("mlp.up_proj.bias",),
    "down": ("mlp.down_proj.weight",),
    "down_bias": ("mlp.down_proj.bias",),
    "norm_in": ("input_layernorm.weight",),
    "norm_post": ("post_attention_layernorm.weight",),
}


@dataclass
class PackedLayers:
    """All layers' weights, layer-major ([L, ...]); biases are None when the model has none."""

    qkv: torch.Tensor
    o: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    norm_in: torch.Tensor
    norm_post: torch.Tensor
    qkv_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    # (module, attribute, parameter, data_ptr) of every rebound parameter: how staleness is detected
    bindings: list = field(default_factory=list, repr=False)
    # the model layer index of each packed row, when only some layers are packed (a rank of a multi-GPU
    # run holds only its own layer of each group); None: row i is layer i
    layer_ids: tuple[int, ...] | None = None
    # group() results by (l0, P): every eager step asks once per stage (~20 us each on the CPU)
    _groups: dict = field(default_factory=dict, repr=False, compare=False)
    # is_current()'s view of `bindings`: (owners' parameter dicts, attributes, parameters, data pointers)
    _check: tuple | None = field(default=None, repr=False, compare=False)

    def group(self, l0: int, P: int) -> PackedLayers:
        """The weights of layers [l0, l0 + P): views, no copy (made once, then reused)."""
        views = self._groups.get((l0, P))
        if views is None:
            views = self._groups[(l0, P)] = self._views(l0, P)
        return views

    def _views(self, l0: int, P: int) -> PackedLayers:
        row = l0
        if self.layer_ids is not None:
            if tuple(range(l0, l0 + P)) not in {self.layer_ids[i:i + P] for i in range(len(self.layer_ids))}:
                raise ValueError(f"layers {l0}..{l0 + P - 1} are not packed together here "
                                 f"(packed: {list(self.layer_ids)})")
            row = self.layer_ids.index(l0)
        return PackedLayers(**{name: None if getattr(self, name) is None else getattr(self, name)[row:row + P]
                               for name in LAYOUT})

    def is_current(self) -> bool:
        """True while every layer parameter is still the view it was bound to (a `.to()`, a
        `load_state_dict(assign=True)` or a parameter replaced by hand makes the packing stale)."""
        # module._parameters, not getattr: nn.Module.__getattr__ made this check 0.7 ms per step for 32
        # layers (measured on the CPU), host time every eager prefill waits for; then the four columns of the
        # bindings compared with map() instead of a generator over tuples: 46.7 -> 29.2 us per call for
        # SmolLM2's 270 bindings (this 2-core CPU), paid by every prompt and every generate call
        if self._check is None:
            self._check = tuple(map(list, zip(*((module._parameters, attr, param, ptr)
                                                for module, attr, param, ptr in self.bindings)))) or ([],) * 4
        owners, attrs, params, ptrs = self._check
        return (all(map(operator.is_, map(dict.get, owners, attrs), params))
                and list(map(torch.Tensor.data_ptr, params)) == ptrs)


def _params(layer: nn.Module, names: tuple[str, ...]) -> list[tuple[nn.Module, str]] | None:
    """(owner module, attribute) of each named parameter, or None when the layer lacks one (no bias)."""
    out = []
    for name in names:
        owner, _, attr = name.rpartition(".")
        module = layer.get_submodule(owner)
        if getattr(module, attr, None) is None:
            return None
        out.append((module, attr))
    return out


@dataclass
class LayerPacks:
    """Several PackedLayers, each a run of consecutive layers of one shape: what pack_layers makes of
    layers of different sizes (a tensor-parallel rank holds shards of different widths). group() and
    is_current() as PackedLayers'."""

    packs: list[PackedLayers]

    def group(self, l0: int, P: int) -> PackedLayers:
        for pack in self.packs:
            if l0 in pack.layer_ids:
                return pack.group(l0, P)
        raise ValueError(f"layer {l0} is not packed here")

    def is_current(self) -> bool:
        return all(pack.is_current() for pack in self.packs)


def _shape_of(layer: nn.Module) -> tuple:
    return tuple(tuple(getattr(m, a).shape) for names in LAYOUT.values() for m, a in (_params(layer, names) or ()))


def check_float_dtype(dtype) -> None:
    """TypeError unless dtype is a floating torch.dtype (the weights' dtype: from_pretrained's, pack's)."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")


def pack_layers(layers: nn.ModuleList, device: torch.device | None = None,
                dtype: torch.dtype | None = None, copy: bool = True,
                layer_ids: tuple[int, ...] | None = None) -> PackedLayers | LayerPacks:
    """Allocate the packed tensors and rebind every layer's parameters to views of them.

    layer_ids: pack only these layers (in this order; the others are left alone, e.g. on "meta").
    Layers of different shapes are packed in runs of equal ones (a LayerPacks).

    copy=True copies the current values in (parameter by parameter; the old storage is freed as its
    last view goes, so the peak extra memory is about one packed tensor); copy=False leaves them
    uninitialised, for a loader that fills the views afterwards (the layers may then be on "meta").
    device/dtype default to the first layer's.
    """
    if dtype is not None:
        check_float_dtype(dtype)
    if layer_ids is not None:
        layer_ids = tuple(layer_ids)
        layers = [layers[i] for i in layer_ids]
    if len(layers) == 0:
        raise ValueError("no layers to pack")
    shapes = [_shape_of(layer) for layer in layers]
    if len(set(shapes)) > 1:
        ids = layer_ids if layer_ids is not None else tuple(range(len(layers)))
        runs, start = [], 0
        for i in range(1, len(layers) + 1):
            if i == len(layers) or shapes[i] != shapes[start]:
                runs.append(ids[start:i])
                start = i
        everything = dict(zip(ids, layers))
        return LayerPacks([_pack([everything[i] for i in run], device, dtype, copy, run) for run in runs])
    return _pack(layers, device, dtype, copy, layer_ids)


def _pack(layers, device, dtype, copy: bool, layer_ids) -> PackedLayers:
    """pack_layers for layers of one shape."""
    some = layers[0].self_attn.q_proj.weight
    device = torch.device(device) if device is not None else some.device
    dtype = dtype if dtype is not None else some.dtype
    packed, bindings = {}, []
    for name, param_names in LAYOUT.items():
        per_layer = [_params(layer, param_names) for layer in layers]
        if per_layer[0] is None:
            packed[name] = None
            continue
        shapes = [getattr(m, a).shape for m, a in per_layer[0]]
        rows = sum(shape[0] for shape in shapes)
        tensor = torch.empty((len(layers), rows, *shapes[0][1:]), device=device, dtype=dtype)
        for l, owners in enumerate(per_layer):
            row = 0
            for module, attr in owners:
                old = getattr(module, attr)
                view = tensor[l, row:row + old.shape[0]]
                row += old.shape[0]
                if copy:
                    view.copy_(old.detach())
                param = nn.Parameter(view, requires_grad=False)
                setattr(module, attr, param)
                bindings.append((module, attr, param, param.data_ptr()))
        packed[name] = tensor
    return PackedLayers(**packed, bindings=bindings, layer_ids=layer_ids)
