"""Which layers each rank holds and runs when the layers of every CQIL group are spread over P ranks.

With world size W, rank r holds layer l_r (the r-th layer) of every group and runs it; every layer
outside the groups, the embedding, the final norm and the head are replicated on all ranks, so every rank
holds the full hidden state between stages without extra communication. Per group each rank computes its
layer's contribution and one all-reduce (sum) gives every rank the group's output h' (rank.py).

A group of P < W layers leaves ranks P..W-1 idle for that group (they contribute zeros to its
reduction); a group of P > W layers cannot be placed (ValueError).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import CQILConfig, LlamaArgs


@dataclass(frozen=True)
class Placement:
    """rank of world; stages: the model's execution order (CQILConfig.stages)."""

    rank: int
    world: int
    stages: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, rank: int, world: int, args: LlamaArgs, cqil: CQILConfig) -> Placement:
        for name, value in (("rank", rank), ("world", world)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"need 0 <= rank < world, got rank {rank} of world {world}")
        stages = tuple(cqil.stages(args.num_hidden_layers))
        too_big = [list(s) for s in stages if len(s) > world]
        if too_big:
            raise ValueError(f"group {too_big[0]} has {len(too_big[0])} layers, more than the {world} "
                             f"ranks (one layer of a group per rank); use at least {len(too_big[0])} "
                             f"devices or smaller groups")
        return cls(rank, world, stages)

    def is_group(self, s: int) -> bool:
        return len(self.stages[s]) > 1

    def local_layers(self, s: int) -> tuple[int, ...]:
        """The layers of stage s this rank runs: the layer itself when ungrouped; its own layer of a
        group, or () when the group has fewer layers than this rank's index (idle for that group)."""
        stage = self.stages[s]
        if len(stage) == 1:
            return stage
        return (stage[self.rank],) if self.rank < len(stage) else ()

    @property
    def local_stages(self) -> list[tuple[int, ...]]:
        """local_layers of every stage: the stage layout of this rank's KV cache."""
        return [self.local_layers(s) for s in range(len(self.stages))]

    @property
    def held_layers(self) -> tuple[int, ...]:
        return tuple(sorted(layer for stage in self.local_stages for layer in stage))

    def sequential_steps(self) -> int:
        """Layer steps one token passes through: one per stage."""
        return len(self.stages)
