"""Which rank holds and runs what, when a model is spread over W ranks. The one place that says it.

CQIL alone (tensor_parallel=False): rank r holds layer l_r of every group and runs it whole; the layers
outside every group, the embedding and the head are replicated, so every rank holds the full hidden state
between stages. A group of P < W layers leaves ranks P..W-1 idle for it; P > W cannot be placed.

Tensor parallel (tensor_parallel=True), Megatron style inside each stage: a stage of P layers (a group, or
P = 1 for a layer outside the groups) needs W to be a multiple of P, and its k = W / P ranks per layer
split that layer. Rank r runs layer l_{r // k} of the stage, shard s = r % k of it:
* query heads [s H/k, (s+1) H/k), and the key/value heads they attend with: split (Hkv/k each) when k
  divides Hkv, else replicated (k a multiple of Hkv: each rank keeps the one its query heads share);
* rows [s F/k, (s+1) F/k) of gate and up, the same columns of down;
* o_proj and down are row-parallel: the ranks' outputs are partial sums, their biases held by shard 0.
With no groups this is pure tensor parallelism (every layer over all W ranks); with groups it is the
hybrid: groups of P = W run one whole layer per rank (k = 1), as CQIL does, groups of P < W each layer
over k ranks, the layers between the groups over all W. The embedding, final norm and head are replicated.

The reductions per stage (rank.py has the equations): a CQIL group (k = 1) one all-reduce of the ranks'
terms, plus one of the attention outputs when there is a bypass; a stage split over k > 1 ranks one
all-reduce of the attention output's partial sums among its k ranks (over all W ranks, of every layer's
output stacked, when a group has a bypass), then one of every rank's term over all W ranks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..config import CQILConfig, LlamaArgs


@dataclass(frozen=True)
class StagePart:
    """What one rank runs of one stage: `layers` (() when idle for a group, else one layer, or the
    stage's one replicated layer), shard `shard` of `shards` (1: whole layers), and `peers`, the ranks
    running the same layer (its tensor-parallel subgroup, this rank included)."""

    layers: tuple[int, ...]
    shard: int = 0
    shards: int = 1
    peers: tuple[int, ...] = ()


@dataclass(frozen=True)
class Placement:
    """rank of world; stages: the model's execution order (CQILConfig.stages); parts: this rank's part of
    each stage; heads, kv_heads, intermediate: the full layer's sizes (what the shards split)."""

    rank: int
    world: int
    stages: tuple[tuple[int, ...], ...]
    tensor_parallel: bool
    parts: tuple[StagePart, ...]
    heads: int
    kv_heads: int
    intermediate: int

    @classmethod
    def build(cls, rank: int, world: int, args: LlamaArgs, cqil: CQILConfig,
              tensor_parallel: bool = False) -> Placement:
        """ValueError naming the problem when the model cannot be placed so."""
        for name, value in (("rank", rank), ("world", world)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if not isinstance(tensor_parallel, bool):
            raise TypeError(f"tensor_parallel must be True or False, got {tensor_parallel!r}")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"need 0 <= rank < world, got rank {rank} of world {world}")
        stages = tuple(cqil.stages(args.num_hidden_layers))
        if tensor_parallel:
            parts = tuple(_tp_part(rank, world, stage, args) for stage in stages)
        else:
            too_big = [list(s) for s in stages if len(s) > world]
            if too_big:
                raise ValueError(f"group {too_big[0]} has {len(too_big[0])} layers, more than the {world} "
                                 f"ranks (one layer of a group per rank); use at least {len(too_big[0])} "
                                 f"devices, smaller groups, or tensor_parallel=True")
            parts = tuple(_cqil_part(rank, world, stage) for stage in stages)
        return cls(rank, world, stages, tensor_parallel, parts, args.num_attention_heads,
                   args.num_key_value_heads, args.intermediate_size)

    # ----------------------------------------------------------------------------------------------

    def is_group(self, s: int) -> bool:
        return len(self.stages[s]) > 1

    def part(self, s: int) -> StagePart:
        return self.parts[s]

    def local_layers(self, s: int) -> tuple[int, ...]:
        """The layers of stage s this rank runs (() when idle for a group)."""
        return self.parts[s].layers

    @property
    def local_stages(self) -> list[tuple[int, ...]]:
        """local_layers of every stage: the stage layout of this rank's KV cache."""
        return [p.layers for p in self.parts]

    @property
    def held_layers(self) -> tuple[int, ...]:
        return tuple(sorted(layer for p in self.parts for layer in p.layers))

    def sequential_steps(self) -> int:
        """Layer steps one token passes through: one per stage."""
        return len(self.stages)

    def subgroups(self) -> list[tuple[int, ...]]:
        """Every tensor-parallel subgroup of k < W ranks that some stage uses (each a process group every
        rank must create, in this order), without repeats."""
        seen = []
        for stage in self.stages:
            k = self.world // len(stage) if self.tensor_parallel else 1
            if 1 < k < self.world:
                for first in range(0, self.world, k):
                    ranks = tuple(range(first, first + k))
                    if ranks not in seen:
                        seen.append(ranks)
        return seen

    # ----------------------------------------------------------------------------------------------
    # A rank's shards of the weights

    def _part_of_layer(self, layer: int) -> StagePart | None:
        for stage, part in zip(self.stages, self.parts):
            if layer in stage:
                return part if layer in part.layers else None
        return None

    def layer_args(self, layer: int, args: LlamaArgs) -> LlamaArgs:
        """The sizes of this rank's modules of `layer`: its shard's heads, key/value heads and
        intermediate size (the full layer's when it is not split)."""
        part = self._part_of_layer(layer)
        if part is None or part.shards == 1:
            return args
        k = part.shards
        return dataclasses.replace(args, num_attention_heads=args.num_attention_heads // k,
                                   num_key_value_heads=max(1, args.num_key_value_heads // k),
                                   intermediate_size=args.intermediate_size // k)

    def take(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's shard of checkpoint tensor `name` ("layers.3.self_attn.q_proj.weight", HF names
        without "model."), or the tensor itself when it is held whole. Row-parallel biases (o_proj,
        down_proj) are kept by shard 0 and are zeros elsewhere, so that the sum over the shards adds them
        once."""
        if not name.startswith("layers."):
            return tensor
        layer = int(name.split(".")[1])
        part = self._part_of_layer(layer)
        if part is None or part.shards == 1:
            return tensor
        k, s = part.shards, part.shard
        module, kind = name.split(".")[-2], name.split(".")[-1]
        if module == "q_proj":
            return _rows(tensor, s, k)
        if module in ("k_proj", "v_proj"):
            if self.kv_heads % k == 0:
                return _rows(tensor, s, k)
            head_dim = tensor.shape[0] // self.kv_heads
            kv_head = (s * (self.heads // k)) // (self.heads // self.kv_heads)
            return tensor[kv_head * head_dim:(kv_head + 1) * head_dim]
        if module in ("gate_proj", "up_proj"):
            return _rows(tensor, s, k)
        if module in ("o_proj", "down_proj"):
            if kind == "bias":
                return tensor if s == 0 else torch.zeros_like(tensor)
            return _columns(tensor, s, k)
        return tensor  # the norms

    # ----------------------------------------------------------------------------------------------

    def reductions_per_step(self, bypass: int) -> int:
        """All-reduces one forward step makes on this placement (every rank makes the same)."""
        count = 0
        for stage, part in zip(self.stages, self.parts):
            P = len(stage)
            split = self.tensor_parallel and self.world // P > 1
            if split:
                count += 2
            elif P > 1:
                count += 1 + (1 if bypass > 0 else 0)
        return count

    def describe(self) -> dict:
        """The placement as rank_stats() reports it."""
        kind = ("tensor parallel" if not any(len(s) > 1 for s in self.stages) else "hybrid") \
            if self.tensor_parallel else "cqil"
        return {"kind": kind, "world": self.world,
                "stages": [{"layers": list(stage), "runs": list(part.layers), "shard": part.shard,
                            "shards": part.shards} for stage, part in zip(self.stages, self.parts)]}


def _cqil_part(rank: int, world: int, stage: tuple[int, ...]) -> StagePart:
    if len(stage) == 1:
        return StagePart(stage, 0, 1, (rank,))
    return StagePart((stage[rank],) if rank < len(stage) else (), 0, 1, (rank,))


def _tp_part(rank: int, world: int, stage: tuple[int, ...], args: LlamaArgs) -> StagePart:
    P = len(stage)
    where = f"group {list(stage)}" if P > 1 else f"layer {stage[0]}"
    if world % P:
        raise ValueError(f"tensor_parallel=True: {where} has {P} layers, which does not divide the {world} "
                         f"ranks (each layer of a group runs on world / P ranks)")
    k = world // P
    if k > 1:
        H, Hkv, F = args.num_attention_heads, args.num_key_value_heads, args.intermediate_size
        if H % k:
            raise ValueError(f"tensor_parallel=True: {where} is split over {k} ranks, but its {H} attention "
                             f"heads do not divide by {k}")
        if F % k:
            raise ValueError(f"tensor_parallel=True: {where} is split over {k} ranks, but its intermediate size "
                             f"{F} does not divide by {k}")
        if Hkv % k and k % Hkv:
            raise ValueError(f"tensor_parallel=True: {where} is split over {k} ranks, but its {Hkv} key/value "
                             f"heads neither divide by {k} nor divide {k} (to be replicated)")
    j, s = divmod(rank, k)
    return StagePart((stage[j],), s, k, tuple(range(j * k, (j + 1) * k)))


def _rows(t: torch.Tensor, s: int, k: int) -> torch.Tensor:
    n = t.shape[0] // k
    return t[s * n:(s + 1) * n]


def _columns(t: torch.Tensor, s: int, k: int) -> torch.Tensor:
    n = t.shape[1] // k
    return t[:, s * n:(s + 1) * n]
