"""One rank of a CQIL model spread over P processes (one per GPU): RankModel.

Every rank runs the same program (SPMD). Rank r holds layer l_r of every group plus everything that is
replicated (placement.py). For a group G = [l_0 .. l_{P-1}] with input h and bypass d, rank j < P computes
(the equations of model.py, split by layer):
    a_j  = Attn_{l_j}(RMSNorm_in(h))                      on its own KV cache
    b_j  = a_{j-1} + ... + a_{j-min(d, j)}                received from ranks j-1..j-d (comm.py)
    m_j  = MLP_{l_j}(RMSNorm_post(h + a_j + b_j))
    c_j  = [h if j == 0] + (a_j + b_j  "residual" | a_j  "mlp_input") + m_j
and ranks j >= P contribute c_j = 0; one all-reduce (comm.GroupReducer) gives every rank
h' = sum_j c_j = h + sum_j (...), the group's output. Rank 0 adds h so the sum needs no extra step.

The Triton backend runs the same split with the fused kernels (fused.py, one layer per launch here), and
the decode step — reductions included — is captured in one CUDA graph per rank, as is a prompt's step per
length bucket (graphs.PrefillGraphs; the same calls on every rank take the same path). In decode the down
projection's fp32 partial products go straight into the reduction, which forms c_j itself
(GroupReducer.all_reduce_sum: one launch less per group). Both paths are model.StepRunners: the stage
loop is model.forward_step's.

With tensor_parallel=True a stage may be split over k > 1 ranks per layer (placement.py): rank (j, s) runs
shard s of layer l_j, whose attention output is a partial sum a_j^(s) (o_proj is row-parallel, its bias
on shard 0). The MLP's norm needs the whole a_j, so one all-reduce among the layer's k ranks completes it
(with a bypass: one over all ranks of every layer's partials stacked, which also brings the a_i of the
layers before); then m_j^(s) is again a partial sum (down is row-parallel) and
    c = m_j^(s) + [a_j + b_j  "residual" | a_j  "mlp_input"  if s == 0] + [h if rank 0]
summed over all ranks is h' = h + sum_j (...), the stage's output: two all-reduces per stage, for a
layer outside the groups (P = 1, k = W) as for a group of P layers of k = W / P ranks each.

A prefill cuts the run of stages from the first group to the last into two micro-batches of tokens,
A = the first half of every row, B = the second, and runs them in turn, stage by stage: A's group
reduction runs on the communication stream while B's stage computes, and B's while A's next stage
computes. Causal attention lets B's queries read A's keys from the KV cache, where A's stage has put
them before B's stage runs; every other operation acts on each token by itself. So the result is the
unsplit computation's (up to the GEMMs' own rounding at other row counts), and every reduction but the
last overlaps with a whole stage of compute, the skew between the ranks included.
"""

from __future__ import annotations

import hashlib
import json

import torch
import torch.distributed as dist

from ..backends import attach_default
from ..checkpoint import load_pretrained
from ..config import CQILConfig
from ..generation import check_logits_to_keep, generate
from ..graphs import MAX_GRAPHS, DecodeSlots, GraphDecoder, PrefillGraphs, bucket, warm_up, warm_up_buckets
from ..model import (CQILTransformer, KVCache, TorchRunner, check_cache_fits, check_forward_inputs, check_is_cache,
                     forward_step)
from .comm import GroupReducer, PendingReduce, bypass_sum, exchange_bypass, gather_bypass, global_rank
from .placement import Placement

BYPASS_EXCHANGES = ("p2p", "all_reduce")  # RankModel's ways to move the bypass (comm.py)


class RankModel:
    """This rank's part of the model; call it like a CQILLlama (same forward / new_cache / generate).

    Build it with `RankModel.from_pretrained(src, cqil, device=...)` after
    `torch.distributed.init_process_group` (or `parallel.init_from_env()` under torchrun), on every rank.
    """

    def __init__(self, model: CQILTransformer, placement: Placement, group=None, one_shot: bool | None = None,
                 microbatch_rows: int = 512, bypass_exchange: str = "all_reduce",
                 copy_engine: bool | None = None, reducer: GroupReducer | None = None):
        """reducer: one reducer for every reduction of this rank (a one-process timing run of one rank's
        compute, benchmarks/placement_estimate.py); default: one for the whole group and one for each
        tensor-parallel subgroup the placement splits layers over (created collectively here)."""
        check_bypass_exchange(bypass_exchange)
        check_microbatch_rows(microbatch_rows)
        if placement.tensor_parallel and bypass_exchange == "p2p":
            raise ValueError("bypass_exchange='p2p' is not supported with tensor_parallel=True (use 'all_reduce')")
        self.model, self.placement, self.group = model, placement, group
        # How a bypass (d >= 1) moves a_j between the ranks of a group (comm.py): "all_reduce" (one
        # all-reduce of each rank's a_j in its own row, so the decode step is captured in a CUDA graph)
        # or "p2p" (point-to-point sends overlapped with the sender's MLP; decode runs eagerly). Measured
        # on 2 H200s, LLaMA-7B, P = 2, d = 1 decode: 3.06-3.09 ms/token vs 25.5
        # (benchmarks/results/bypass_h200x2_a5f97c4.json).
        self.bypass_exchange = bypass_exchange
        self.args = model.args
        self.stages = placement.local_stages  # the layout of this rank's KV cache
        # Prefill: the grouped stages run as two micro-batches of tokens (module docstring) when each
        # has at least `microbatch_rows` rows (0: never). The split costs compute: smaller GEMMs, a
        # second pass over the stage's weights and launches. One rank's LLaMA-7B prefill on an H200,
        # reductions skipped (benchmarks/results/microbatch_cost_h200_2026-12-04.json):
        # +0.83 ms at 512 tokens (2 x 256 rows; the reductions it would hide cost about 0.5 ms there),
        # +0.68 at 768, +0.10 at 1024, +0.18 of 40.8 ms at 2048; after the fused prefill epilogues
        # (fused.py) +0.28 to +0.37 ms at 512. Hence halves of at least 512 rows,
        # until two GPUs show what the hidden reductions save at 512 (parallel_e2e.py --prefill-variants).
        self.microbatch_rows = microbatch_rows
        if copy_engine is None and microbatch_rows == 0:  # only micro-batches reduce through it
            copy_engine = False
        # the sizes of this rank's modules of each layer it holds (a shard's, where a layer is split)
        self.layer_args = {layer: placement.layer_args(layer, model.args) for layer in placement.held_layers}
        self.subgroup_reducers: dict[tuple[int, ...], GroupReducer] = {}
        self._graphs: PrefillGraphs | None = None  # made at the first prompt one serves
        self._decode_slots: DecodeSlots | None = None  # made at the first generate whose decode is a graph
        if reducer is not None:
            self.reducer = reducer
            return
        self.reducer = GroupReducer(model.device, group, one_shot=one_shot, copy_engine=copy_engine)
        # every rank creates every subgroup (torch.distributed's rule), then its own subgroups' reducers
        subgroups = [(ranks, dist.new_group([global_rank(group, r) for r in ranks]))
                     for ranks in placement.subgroups()]
        for ranks, process_group in subgroups:
            if placement.rank in ranks:
                self.subgroup_reducers[ranks] = GroupReducer(model.device, process_group, one_shot=one_shot,
                                                             copy_engine=False)

    def _reducer_of(self, peers: tuple[int, ...]) -> GroupReducer:
        """The reducer over `peers` (a layer's tensor-parallel ranks): the group's own when they are all."""
        if len(peers) == self.placement.world:
            return self.reducer
        return self.subgroup_reducers.get(peers, self.reducer)

    cuda_graphs = True  # decoder() replays a captured step where decodes_in_a_graph()
    prefill_graphs = True  # and forward() a prompt's step, per length bucket (graphs.PrefillGraphs)
    prefill_graph_limit = MAX_GRAPHS  # the buckets kept (the same on every rank: the calls take the same path)

    @classmethod
    def from_pretrained(cls, src, cqil=None, *, device=None, dtype=None, lora=None, progress: bool = False,
                        group=None, backend: str = "auto", one_shot: bool | None = None,
                        bypass_exchange: str = "all_reduce", microbatch_rows: int = 512,
                        copy_engine: bool | None = None, tensor_parallel: bool = False) -> RankModel:
        """Load this rank's layers (CQILLlama.from_pretrained's arguments) and check that every rank
        was given the same model and grouping (ValueError on every rank otherwise, before any of the
        model's collectives)."""
        check_bypass_exchange(bypass_exchange)
        check_microbatch_rows(microbatch_rows)
        if not dist.is_initialized():
            raise ValueError("RankModel needs torch.distributed initialised (init_process_group, or "
                             "cqil_kernels.parallel.init_from_env() under torchrun)")
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if tensor_parallel and bypass_exchange == "p2p":
            raise ValueError("bypass_exchange='p2p' is not supported with tensor_parallel=True (use 'all_reduce')")
        model = load_pretrained(
            CQILTransformer, src, cqil=cqil, device=device, dtype=dtype, lora=lora, progress=progress,
            placement=lambda args, grouping: Placement.build(rank, world, args, grouping, tensor_parallel))
        attach_default(model)
        model.backend = backend
        _check_same_on_every_rank(model, group, tensor_parallel)
        placement = Placement.build(rank, world, model.args, model.cqil, tensor_parallel)
        return cls(model, placement, group=group, one_shot=one_shot, bypass_exchange=bypass_exchange,
                   microbatch_rows=microbatch_rows, copy_engine=copy_engine)

    # ----------------------------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self.placement.rank

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def cqil(self) -> CQILConfig:
        return self.model.cqil

    def parameter_bytes(self) -> int:
        """Bytes of weights this rank holds (tied embeddings counted once)."""
        seen, total = set(), 0
        for p in self.model.parameters():
            if p.is_meta or p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
        return total

    def stats(self) -> dict:
        """What ParallelCQILLlama.rank_stats() reports for this rank: device, the placement (what this
        rank runs of each stage) and its all-reduces per step, parameter bytes, peak device memory (CUDA),
        how many reductions took each path (one-shot, copy engine, the backend's) with the last fallback
        reason, whether the one-shot and copy-engine paths could be set
        up (else why not), the prefill micro-batch threshold, the bypass exchange, whether decode
        steps are CUDA graph replays and the bytes of the KV caches generate keeps with their graphs."""
        policy, copy_engine = self.reducer.one_shot_policy, self.reducer.copy_engine_policy
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        reductions = dict(self.reducer.calls)
        for sub in self.subgroup_reducers.values():
            for path, n in sub.calls.items():
                reductions[path] = reductions.get(path, 0) + n
        return {"device": str(self.device), "placement": self.placement.describe(),
                "reductions_per_step": self.placement.reductions_per_step(self.model.cqil.bypass),
                "parameter_bytes": self.parameter_bytes(), "peak_device_bytes": peak,
                "reductions": reductions, "one_shot": policy.enabled,
                "one_shot_reason": policy.reason or None, "copy_engine": copy_engine.enabled,
                "copy_engine_reason": copy_engine.reason or None, "microbatch_rows": self.microbatch_rows,
                "last_fallback_reason": self.reducer.last_reason,
                "bypass_exchange": self.bypass_exchange, "decode_graph": self.decodes_in_a_graph(),
                "kept_kv_cache_bytes": self._decode_slots.cache_bytes() if self._decode_slots is not None else 0}

    def new_cache(self, batch: int, max_seq: int) -> KVCache:
        kv_heads = [self.layer_args[layers[0]].num_key_value_heads if layers else 0 for layers in self.stages]
        return KVCache(self.args, self.stages, batch, max_seq, self.device, self.dtype, kv_heads=kv_heads)

    # ----------------------------------------------------------------------------------------------

    def __call__(self, input_ids, attention_mask=None, cache: KVCache | None = None,
                 logits_to_keep: int = 0) -> torch.Tensor:
        return self.forward(input_ids, attention_mask, cache, logits_to_keep)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab], the same on every rank (CQILLlama.forward)."""
        input_ids, attention_mask, _ = check_forward_inputs(self, input_ids, attention_mask, cache)
        return self.forward_checked(input_ids, attention_mask, cache, check_logits_to_keep(logits_to_keep))

    @torch.inference_mode()
    def forward_checked(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache | None,
                        keep: int) -> torch.Tensor:
        """CQILTransformer.forward_checked for this rank."""
        check_cache_fits(self, input_ids.shape, cache)
        if (self.prefill_graphs and self.decodes_in_a_graph(input_ids.shape[0])
                and PrefillGraphs.serves(self, input_ids, cache)
                and self._step_capturable(input_ids.shape[0], bucket(input_ids.shape[1]))):
            # every rank takes this branch for the same calls: it depends on shapes and lengths only
            if self._graphs is None:
                self._graphs = PrefillGraphs(self, RankModel._padded_step, limit=self.prefill_graph_limit)
            logits = self._graphs(self, input_ids, attention_mask, cache, keep)
        elif self.model.accelerated():
            logits = self._triton_step(input_ids, attention_mask, cache if cache is not None
                                       else self.new_cache(*input_ids.shape), keep)
        else:
            logits = forward_step(_RankTorchRunner(self), self.placement.stages, input_ids, attention_mask, cache,
                                  keep)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return logits

    def _group_torch(self, h: torch.Tensor, s: int, ctx, kv) -> torch.Tensor:
        stage, j = self.placement.stages[s], self.rank
        cqil = self.model.cqil
        if not self.stages[s]:  # idle for this group
            self._bypass(None, len(stage), h)
            c = torch.zeros_like(h)
        else:
            layer = self.model.layers[self.stages[s][0]]
            a = layer.attend(h, ctx, kv)
            b, sends = self._bypass(a.contiguous(), len(stage), h)
            ab = a if b is None else a + b
            m = layer.feed_forward(h + ab)
            c = (ab if cqil.bypass_mode == "residual" else a) + m
            if j == 0:
                c = h + c
            for work in sends:
                work.wait()
        return self.reducer.all_reduce(c.contiguous())

    def _split_torch(self, h: torch.Tensor, s: int, ctx, kv) -> torch.Tensor:
        """A stage split over k > 1 ranks per layer, this rank's shard of its layer (module docstring)."""
        part, cqil = self.placement.part(s), self.model.cqil
        layer = self.model.layers[part.layers[0]]
        a, b = self._attention_sum(layer.attend(h, ctx, kv).contiguous(), s)
        ab = a if b is None else a + b
        c = layer.feed_forward(h + ab)
        if part.shard == 0:
            c = c + (ab if cqil.bypass_mode == "residual" else a)
        if self.rank == 0:
            c = c + h
        return self.reducer.all_reduce(c.contiguous())

    def _attention_sum(self, a: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(a_j, b_j) from this shard's partial sum a of stage s's attention output: one all-reduce among
        the layer's ranks, or, with a bypass in a group, one over all ranks of every layer's partials
        stacked (row j of a zeroed [P, ...] buffer), whose rows are then every a_i."""
        part, stage = self.placement.part(s), self.placement.stages[s]
        P, d = len(stage), self.model.cqil.bypass
        if P == 1 or d == 0:
            return self._reducer_of(part.peers).all_reduce(a), None
        j = stage.index(part.layers[0])
        rows = torch.zeros((P, *a.shape), dtype=a.dtype, device=a.device)
        rows[j].copy_(a)
        self.reducer.all_reduce(rows)
        return rows[j], bypass_sum([rows[i] for i in range(max(0, j - d), j)])

    # ----------------------------------------------------------------------------------------------
    # Triton backend (CUDA, or CPU under TRITON_INTERPRET=1)

    def _triton_step(self, input_ids: torch.Tensor, valid: torch.Tensor | None, cache: KVCache,
                     logits_to_keep: int = 0) -> torch.Tensor:
        """fused.step for this rank: graph-safe (no host reads of device values)."""
        return forward_step(_RankTritonRunner(self), self.placement.stages, input_ids, valid, cache, logits_to_keep)

    def _padded_step(self, input_ids: torch.Tensor, valid: torch.Tensor, cache: KVCache,
                     rows: torch.Tensor | None) -> torch.Tensor:
        """fused.padded_step for this rank (the step graphs.PrefillGraphs captures, reductions included)."""
        return forward_step(_RankTritonRunner(self, rows), self.placement.stages, input_ids, valid, cache)

    def _step_capturable(self, B: int, rows: int) -> bool:
        """Whether every reduction of a step of B x `rows` tokens (a prompt's: its bucket; a decode step's: 1)
        can be captured in a CUDA graph: NCCL's can; through gloo (ranks sharing one GPU) only those the
        one-shot kernel takes, the largest being a group's stacked bypass rows, and no micro-batches. The same
        answer on every rank."""
        if self.reducer.backend == "nccl":
            return True
        policy = self.reducer.one_shot_policy
        P = max(len(stage) for stage in self.placement.stages)
        nbytes = P * B * rows * self.args.hidden_size * self.dtype.itemsize
        return policy.enabled and nbytes <= policy.max_bytes and self.microbatch_span(B, rows) is None

    def packed_weights(self):
        """The packed weights of this rank's layers (CQILTransformer.packed_weights)."""
        return self.model.packed_weights()

    @property
    def packed(self):
        """The packed weights as last packed (CQILTransformer.packed), None before the first packing."""
        return self.model.packed

    def graph_signature(self, scan: bool = True) -> tuple:
        """What this rank's captured graphs read (CQILTransformer.graph_signature)."""
        return self.model.graph_signature(scan)

    def microbatch_span(self, B: int, T: int) -> tuple[int, int] | None:
        """(first, last) stage run as two micro-batches of tokens for a step of B x T tokens, or None:
        from the first group to the last, when each half has at least microbatch_rows rows (the same
        on every rank: it depends only on the shape and the grouping)."""
        grouped = [s for s, stage in enumerate(self.placement.stages) if len(stage) > 1]
        if not grouped or self.microbatch_rows == 0 or T < 2 or B * (T // 2) < self.microbatch_rows:
            return None
        return grouped[0], grouped[-1]


    def _stage(self, s: int, h: torch.Tensor, positions: torch.Tensor, start: torch.Tensor, cache: KVCache,
               packed, overlap: bool = False):
        """Stage s on h [M, D] (tokens positions [B, T], their first cache slot `start`; packed: the
        model's packed layers): the stage's output, or with overlap=True a PendingReduce of it (for a
        group, its reduction running on the communication stream)."""
        from .. import fused
        from ..ops.group_residual import rank_residual

        model, args, cqil = self.model, self.args, self.model.cqil
        stage, local, part = self.placement.stages[s], self.stages[s], self.placement.part(s)
        if part.shards > 1:
            return self._split_stage(s, h, positions, start, cache, packed, overlap)
        if len(stage) == 1:
            out = fused.stage_forward(packed.group(stage[0], 1), h, positions, cache.k[s], cache.v[s],
                                      cache.key_valid, start, model.inv_freq, args=args, bypass=0,
                                      bypass_mode=cqil.bypass_mode)
            return PendingReduce(out) if overlap else out
        if not local:  # idle for this group: contribute zeros
            self._bypass(None, len(stage), h)
            return self._down_reduce(None, None, None, h, overlap)
        w = packed.group(local[0], 1)
        a = fused.stage_attention(w, h, positions, cache.k[s], cache.v[s], cache.key_valid, start,
                                  model.inv_freq, args=args)
        b, sends = self._bypass(a[0], len(stage), h)
        xn, residual = rank_residual(h, a[0], w.norm_post[0], eps=args.rms_norm_eps, received=b,
                                     include_h=self.rank == 0, bypass_mode=cqil.bypass_mode)
        act = fused.swiglu(xn[None], w.gate, w.up, bias_gate=w.gate_bias, bias_up=w.up_bias)
        out = self._down_reduce(act, w, residual, h, overlap)
        for work in sends:
            work.wait()
        return out

    def _split_stage(self, s: int, h: torch.Tensor, positions: torch.Tensor, start: torch.Tensor, cache: KVCache,
                     packed, overlap: bool):
        """_stage for a stage split over k > 1 ranks per layer (this rank's shard of its layer)."""
        from .. import fused
        from ..ops.group_residual import rank_residual

        part, cqil = self.placement.part(s), self.model.cqil
        layer = part.layers[0]
        w, layer_args = packed.group(layer, 1), self.layer_args[layer]
        a = fused.stage_attention(w, h, positions, cache.k[s], cache.v[s], cache.key_valid, start,
                                  self.model.inv_freq, args=layer_args)
        a, b = self._attention_sum(a[0], s)
        xn, residual = rank_residual(h, a, w.norm_post[0], eps=layer_args.rms_norm_eps, received=b,
                                     include_h=self.rank == 0, bypass_mode=cqil.bypass_mode)
        if part.shard != 0:  # the attention terms (and h) are added by shard 0 of each layer
            residual.zero_()
        act = fused.swiglu(xn[None], w.gate, w.up, bias_gate=w.gate_bias, bias_up=w.up_bias)
        return self._down_reduce(act, w, residual, h, overlap)

    def _bypass(self, a: torch.Tensor | None, P: int, h: torch.Tensor) -> tuple[torch.Tensor | None, list]:
        """(b, pending sends) for this rank in a group of P ranks, its attention output a (None: idle
        for the group; only the "all_reduce" exchange needs idle ranks, so it is a no-op for "p2p")."""
        d = self.model.cqil.bypass
        if self.bypass_exchange == "all_reduce":
            return gather_bypass(a, self.rank, P, d, self.reducer, h), []
        if a is None:
            return None, []
        return exchange_bypass(a, self.rank, P, d, self.group)

    def _down_reduce(self, act: torch.Tensor | None, w, residual: torch.Tensor | None, h: torch.Tensor,
                     overlap: bool = False):
        """h' = sum over ranks of (residual + act @ Wd.T) (act None: this rank adds zeros). overlap=True
        returns the reduction pending on the communication stream (GroupReducer.all_reduce_async) for
        the caller to wait on; otherwise it runs on the current stream."""
        from ..fused import down_partials, down_sum

        out = torch.zeros_like(h) if act is None else torch.empty_like(h)
        if overlap:
            if act is not None:
                down_sum(act, w.down, residual, bias=w.down_bias, out=out)
            return self.reducer.all_reduce_async(out)
        if act is None:
            return self.reducer.all_reduce(out)
        parts = down_partials(act, w.down, bias=w.down_bias)
        if parts is not None:  # decode: the reduction forms residual + the partial products itself
            return self.reducer.all_reduce_sum(parts, residual, out)
        down_sum(act, w.down, residual, bias=w.down_bias, out=out)
        return self.reducer.all_reduce(out)

    # ----------------------------------------------------------------------------------------------

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        return self.model.argmax(logits)

    def decodes_in_a_graph(self, batch: int = 1) -> bool:
        """Whether decoder() captures the step of `batch` rows in a CUDA graph: on the Triton backend on CUDA,
        unless a bypass moves through NCCL point-to-point transfers (bypass_exchange="p2p"), which we do not
        capture ("all_reduce" moves it through the reducer instead), or a reduction of the step cannot be
        captured (_step_capturable: through gloo without the one-shot kernel, e.g. ranks sharing one GPU with
        an extension built without CUDA; a capture would fail)."""
        bypass_p2p = (self.model.cqil.bypass > 0 and self.bypass_exchange == "p2p"
                      and any(len(s) > 1 for s in self.placement.stages))
        return (self.cuda_graphs and self.device.type == "cuda" and self.model.accelerated() and not bypass_p2p
                and self._step_capturable(batch, 1))

    def decoder(self, cache: KVCache, check_tokens: bool = True):
        """One decode step next_tokens [B] -> logits [B, vocab]: a CUDA graph replay per token (the
        reductions captured in it) where decodes_in_a_graph(), else an eager forward; check_tokens as
        CQILTransformer.decoder's."""
        check_is_cache(cache)
        if self.decodes_in_a_graph(cache.batch):
            return GraphDecoder(self, cache, step_fn=self._triton_step, check_tokens=check_tokens)
        if check_tokens:
            return lambda next_tokens: self.forward(next_tokens[:, None], cache=cache)[:, -1]
        return lambda next_tokens: self.forward_checked(next_tokens[:, None], None, cache, 0)[:, -1]

    def generation_cache(self, batch: int, max_seq: int):
        """CQILLlama.generation_cache for this rank: where decodes_in_a_graph(), a cache and its decode graph
        kept from an earlier generate (graphs.DecodeSlots; every rank keeps and takes the same slots, the
        choice depends on shapes only), else a new cache and decoder()."""
        if self.decodes_in_a_graph(batch):
            if self._decode_slots is None:
                self._decode_slots = DecodeSlots(lambda model, cache: model.decoder(cache, check_tokens=False),
                                                 shrink=False)
            return self._decode_slots.take(self, batch, max_seq)
        cache = self.new_cache(batch, max_seq)
        return cache, self.decoder(cache, check_tokens=False)

    def warm_up(self, batch: int, max_seq: int, lengths: list[int]) -> list[int]:
        """CQILTransformer.warm_up for this rank (graphs.warm_up, the same calls on every rank): [] where
        its decode steps are not captured (decodes_in_a_graph())."""
        prompts = self.prefill_graphs
        longest = warm_up_buckets(lengths, prompts, self.prefill_graph_limit)
        if not self.decodes_in_a_graph(batch):
            return []
        return warm_up(self, batch, max_seq, longest, prompts)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """CQILLlama.generate on every rank (same arguments everywhere); returns the same ids on every
        rank — checked once at the end (RuntimeError if the ranks' tokens ever parted)."""
        out = generate(self, input_ids, max_new_tokens, **kwargs)
        self.check_same_tokens(out)
        return out

    def check_same_tokens(self, tokens: torch.Tensor) -> None:
        """After a generate loop (every rank calls it): the reductions' health, then RuntimeError unless every
        rank holds rank 0's tokens."""
        self.reducer.check_health()
        mine = tokens.to(self.device)
        ref = mine.clone()
        dist.broadcast(ref, src=global_rank(self.group, 0), group=self.group)
        if not torch.equal(ref, mine):
            raise RuntimeError(f"rank {self.rank} generated other tokens than rank 0 (nondeterministic "
                               f"sampling across ranks?)")


class _RankTorchRunner(TorchRunner):
    """The torch path of a rank: ungrouped layers as model.py runs them; a group as this rank's layer and
    the reduction (RankModel._group_torch). Its KV cache holds only this rank's layers."""

    def __init__(self, rank_model: RankModel):
        super().__init__(rank_model.model)
        self.rank_model = rank_model

    def stage(self, s, stage, h, state):
        ctx, cache = state
        kv = cache.layer(s, 0) if cache is not None and self.rank_model.stages[s] else None
        if self.rank_model.placement.part(s).shards > 1:
            return self.rank_model._split_torch(h, s, ctx, kv)
        if len(stage) == 1:
            return self.model.layers[stage[0]](h, ctx, kv)
        return self.rank_model._group_torch(h, s, ctx, kv)


class _Halves:
    """A prefill's hidden state while its grouped stages run as two micro-batches of tokens (module
    docstring): each half's stage output, pending until its reduction is waited for."""

    def __init__(self, pending: list[PendingReduce], bounds, positions, starts):
        self.pending, self.bounds, self.positions, self.starts = pending, bounds, positions, starts


class _RankTritonRunner:
    """model.StepRunner of a rank on the fused kernels (fused.TritonRunner's state: positions, cache).
    rows: as fused.PaddedRunner's (a padded prompt's logits rows; None: the last `keep` of each row)."""

    def __init__(self, rank_model: RankModel, rows: torch.Tensor | None = None):
        self.rank_model, self.model, self.rows = rank_model, rank_model.model, rows
        self.packed = self.model.packed_weights()

    def begin(self, input_ids, valid, cache):
        from ..fused import advance

        B, T = input_ids.shape
        return advance(cache, valid, T), cache, self.rank_model.microbatch_span(B, T)

    def embed(self, input_ids, state):
        return self.model.embed_tokens(input_ids).view(input_ids.numel(), -1)

    def stage(self, s, stage, h, state):
        positions, cache, span = state
        if span is not None and s == span[0]:
            h = self._split(h, positions, cache)
        if isinstance(h, _Halves):
            for i in (0, 1):
                h.pending[i] = self.rank_model._stage(s, h.pending[i].wait(), h.positions[i], h.starts[i], cache,
                                                      self.packed, overlap=True)
        else:
            h = self.rank_model._stage(s, h, positions, cache.start, cache, self.packed)
        if span is not None and s == span[1]:
            h = self._join(h, positions)
        return h

    def end(self, h, state, keep):
        from ..fused import picked_logits

        return picked_logits(self.model, h, state[0].shape, keep, self.rows)

    @staticmethod
    def _split(h: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> _Halves:
        """h [B*T, D] -> the first half of every row's tokens and the second."""
        B, T = positions.shape
        cut, D = T // 2, h.shape[-1]
        rows = h.view(B, T, D)
        bounds = ((0, cut), (cut, T))
        return _Halves([PendingReduce(rows[:, lo:hi].reshape(B * (hi - lo), D)) for lo, hi in bounds], bounds,
                       [positions[:, lo:hi].contiguous() for lo, hi in bounds],
                       [cache.start, cache.start + cut])  # the cache slot of each half's first token

    @staticmethod
    def _join(h: _Halves, positions: torch.Tensor) -> torch.Tensor:
        B, T = positions.shape
        x = [p.wait() for p in h.pending]
        D = x[0].shape[-1]
        return torch.cat([x[i].view(B, hi - lo, D) for i, (lo, hi) in enumerate(h.bounds)], dim=1).view(B * T, D)


def _check_same_on_every_rank(model: CQILTransformer, group, tensor_parallel: bool = False) -> None:
    """ValueError on every rank when the ranks loaded different configs, groupings or placements."""
    mine = {"args": repr(model.args), "cqil": model.cqil.to_dict(), "dtype": str(model.dtype),
            "tensor_parallel": tensor_parallel}
    fingerprint = hashlib.sha256(json.dumps(mine, sort_keys=True).encode()).hexdigest()
    world = dist.get_world_size(group)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, (fingerprint, mine), group=group)
    differ = [r for r, (fp, _) in enumerate(everyone) if fp != everyone[0][0]]
    if differ:
        r = differ[0]
        keys = [k for k in mine if everyone[r][1][k] != everyone[0][1][k]]
        raise ValueError(f"rank {r} was given another model than rank 0 (different {', '.join(keys)}): "
                         f"every rank must load the same checkpoint, grouping and dtype")


def check_bypass_exchange(value) -> None:
    if value not in BYPASS_EXCHANGES:
        raise ValueError(f"bypass_exchange must be one of {BYPASS_EXCHANGES}, got {value!r}")


def check_microbatch_rows(value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"microbatch_rows must be an int >= 0 (0: never split a prefill), got {value!r}")
