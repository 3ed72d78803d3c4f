"""The fused Triton backend of the model (model.py), attached to a model with `attach(model)`.

Every stage (a CQIL group of P layers, or one ungrouped layer as P = 1) runs as seven launches, whatever
P is:

    1 group_linear    qkv[p]  = RMSNorm_in_p(h) @ Wqkv[p].T             all P layers read the same h
    2 rope_kv_write   rotate q, k of all P layers; write k, v into the group's caches
    3 group_attention each layer over its own cache (split-KV flash decoding when T = 1)
    4 group_linear    a[p]    = attn[p] @ Wo[p].T
    5 group_residual  xn[p]   = RMSNorm_post_p(h + a_p + b_p);   R = h + sum (a_p [+ b_p])
    6 group_swiglu    act[p]  = silu(xn[p] @ Wg[p].T) * (xn[p] @ Wu[p].T)
    7 group_down_sum  h'      = R + sum_p act[p] @ Wd[p].T          one GEMM over K = P * F

A stage of one layer runs six in decode: o_proj adds h in its epilogue and gate/up applies the
post-attention norm in its prologue, so launch 5 goes. A prompt of many rows with large weights runs the
matmuls of launches 1, 4, 6 and 7 through cuBLAS instead (use_blas), with the input norm
(ops.rms_norm), SwiGLU's silu(g) * u and the down projection's sum with the residual (ops.group_gemm.
silu_mul, sum_parts) as one launch each around them. Around the stages: one cache_advance launch (the
cache's bookkeeping) before, and the final RMSNorm + lm_head after (in decode one group_linear with the
norm in its prologue).

The step never reads a device value on the host (the cache position lives on the device), so on CUDA a
decode step and a prompt's forward are captured in CUDA graphs and replayed (graphs.py: GraphDecoder, per
token; PrefillGraphs, per prompt-length bucket). docs/performance.md holds the measurements behind each
choice.
"""

from __future__ import annotations

import functools

import torch

from . import envs
from .graphs import (MAX_GRAPHS, DecodeSlots, GraphDecoder, PrefillGraphs, check_limit, warm_up,
                     warm_up_buckets)
from .model import KVCache, forward_step, rms_norm
from .ops._common import SUPPORTED_DTYPES, triton_unavailable_reason
from .ops.argmax import row_argmax
from .ops.attention import group_attention
from .ops.cache_advance import cache_advance
from .ops.group_gemm import group_down_partials, group_down_sum, group_linear, group_swiglu, silu_mul, sum_parts
from .ops.group_residual import group_residual
from .ops.rms_norm import group_rms_norm
from .ops.rope_kv import rope_kv_write
from .packing import PackedLayers

# Up to this many rows the final norm + lm_head is one group_linear; above, RMSNorm and cuBLAS (H100,
# median of CUDA-graph replays: T = 1 Triton 95.9 vs 115.8 us LLaMA-7B, 24.0 vs 39.7 us SmolLM2;
# T = 512 Triton 391 vs 252 us, 94 vs 76 us; benchmarks/bench_group_gemm.py::test_head).
HEAD_ROWS = 16


# The fold's row limit (decode tiles, whose gate/up norm takes the sums of squares from x x^T): larger
# tiles would take them in a second pass over x per column tile, which made a LLaMA-7B prefill of 512 rows
# 20.1 ms on the device against 16.6 unfolded (H100).
FOLD_ROWS = 16


# The rule for the cuBLAS prefill form (CQIL_PREFILL_BLAS_ROWS unset): steps of at least this many rows,
# for weights of at least this many elements per layer. H100, device time: LLaMA-7B sequential prefill of
# 512 rows 16.6 ms with the kernels vs 14.1 with cuBLAS, but 6.48 vs 7.72 at 32 rows; SmolLM2-135M is
# faster with the kernels at every length (512 rows: 1.89 vs 3.12 ms).
AUTO_BLAS_ROWS = 128
AUTO_BLAS_WEIGHT = 1 << 22


def use_blas(rows: int, w: torch.Tensor) -> bool:
    """Whether a step of `rows` rows runs the matmul with weights w [P, N, K] through torch (cuBLAS on a
    GPU, one batched call for the P layers) rather than the group GEMM kernels; attention, RoPE and the
    residual/norm kernels stay."""
    forced = envs.get("CQIL_PREFILL_BLAS_ROWS")
    if forced is None:
        return rows >= AUTO_BLAS_ROWS and w.shape[-1] * w.shape[-2] >= AUTO_BLAS_WEIGHT
    return 0 < forced <= rows


def linear(x: torch.Tensor, w: torch.Tensor, *, norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
           bias: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """ops.group_linear, or for many rows its torch form: the norm as the torch backend's RMSNorm rounds
    it, then one batched matmul."""
    if not use_blas(x.shape[-2], w):
        return group_linear(x, w, norm_weight=norm_weight, eps=eps, bias=bias, residual=residual)
    if norm_weight is not None and x.ndim == 2:  # x [M, K] shared by the group -> each layer's normalized
        x = group_rms_norm(x, norm_weight, eps=eps)  # copy [P, M, K], rounded as rms_norm rounds, one launch
    elif norm_weight is not None:
        x = rms_norm(x, norm_weight[:, None, :], eps)
    out = torch.matmul(x, w.transpose(1, 2))
    if bias is not None:
        out += bias[:, None]
    if residual is not None:
        out += residual
    return out


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, *, bias_gate: torch.Tensor | None = None,
           bias_up: torch.Tensor | None = None) -> torch.Tensor:
    """ops.group_swiglu (x: [P, M, K]), or for many rows silu(x Wg^T) * (x Wu^T): the matmuls through
    torch, the product in one launch (ops.group_gemm.silu_mul)."""
    if not use_blas(x.shape[-2], gate):
        return group_swiglu(x, gate, up, bias_gate=bias_gate, bias_up=bias_up)
    g, u = torch.matmul(x, gate.transpose(1, 2)), torch.matmul(x, up.transpose(1, 2))
    if bias_gate is not None:
        g += bias_gate[:, None]
        u += bias_up[:, None]
    return silu_mul(g, u)


def down_sum(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor, *, bias: torch.Tensor | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """ops.group_down_sum, or for many rows one batched matmul whose P products are summed in fp32 with
    the residual (in layer order), rounded once."""
    if not use_blas(x.shape[-2], w):
        return group_down_sum(x, w, residual, bias=bias, out=out)
    if bias is None:  # the products, then residual + products in order in one launch (ops.sum_parts)
        return sum_parts(torch.matmul(x, w.transpose(1, 2)), residual, dtype=x.dtype, out=out)
    total = residual.float() + torch.matmul(x, w.transpose(1, 2)).float().sum(0) + bias.float().sum(0)
    if out is None:
        return total.to(x.dtype)
    return out.copy_(total)


def down_partials(x: torch.Tensor, w: torch.Tensor, *, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """ops.group_down_partials where down_sum runs the group GEMM kernels (decode), else None: the fp32
    partial products whose sum with the residual, in order and rounded once, is down_sum's output."""
    return None if use_blas(x.shape[-2], w) else group_down_partials(x, w, bias=bias)


def stage_attention(w: PackedLayers, h: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, key_valid: torch.Tensor, start: torch.Tensor,
                    inv_freq: torch.Tensor, *, args, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Launches 1-4 of a stage of P layers: h [B*T, D] -> the attention outputs a [P, B*T, D]
    (residual [B*T, D]: + residual, added by o_proj's epilogue)."""
    P = w.qkv.shape[0]
    B, T = positions.shape
    H, Dh = args.num_attention_heads, args.head_dim
    qkv = linear(h, w.qkv, norm_weight=w.norm_in, eps=args.rms_norm_eps, bias=w.qkv_bias)
    rope_kv_write(qkv, positions, inv_freq, k_cache, v_cache, start, num_heads=H,
                  num_kv_heads=args.num_key_value_heads)
    q = qkv.view(P, B, T, -1)[..., :H * Dh].unflatten(-1, (H, Dh))
    attn = group_attention(q, k_cache, v_cache, key_valid, start, keys_before_wait=True)  # rope_kv just wrote
    return linear(attn.view(P, B * T, H * Dh), w.o, bias=w.o_bias, residual=residual)


def stage_forward(w: PackedLayers, h: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, key_valid: torch.Tensor, start: torch.Tensor, inv_freq: torch.Tensor,
                  *, args, bypass: int, bypass_mode: str) -> torch.Tensor:
    """One stage of P layers. h: [B*T, D]; positions: [B, T]; caches [P, B, Hkv, S, Dh] -> h' [B*T, D]."""
    P = w.qkv.shape[0]
    if P == 1 and h.shape[0] <= FOLD_ROWS:  # h + a from o_proj's epilogue, the norm in gate/up's prologue
        h_mid = stage_attention(w, h, positions, k_cache, v_cache, key_valid, start, inv_freq, args=args,
                                residual=h)
        act = group_swiglu(h_mid, w.gate, w.up, norm_weight=w.norm_post, eps=args.rms_norm_eps,
                           bias_gate=w.gate_bias, bias_up=w.up_bias)
        return group_down_sum(act, w.down, h_mid[0], bias=w.down_bias)
    a = stage_attention(w, h, positions, k_cache, v_cache, key_valid, start, inv_freq, args=args)
    xn, residual = group_residual(h, a, w.norm_post, eps=args.rms_norm_eps,
                                  bypass=bypass if P > 1 else 0, bypass_mode=bypass_mode)
    act = swiglu(xn, w.gate, w.up, bias_gate=w.gate_bias, bias_up=w.up_bias)
    return down_sum(act, w.down, residual, bias=w.down_bias)


def advance(cache, valid: torch.Tensor | None, T: int) -> torch.Tensor:
    """Record T new tokens per row (valid: [B, T] bool, None = all real) in the cache's bookkeeping on
    the device and move its position on; returns their RoPE positions [B, T]. The step's kernels take
    their first slot from `cache.start`. The caller advances the host-side `cache.length`."""
    return cache_advance(valid, cache.key_valid, cache.n_tokens, cache.position, cache.start, T)


def last_logits(model, h: torch.Tensor, shape: torch.Size, keep: int) -> torch.Tensor:
    """The end of a step: h [B*T, D] (shape: (B, T)) -> the logits [B, keep, V] of each sequence's last
    `keep` positions."""
    B, T = shape
    if keep < T:
        h = h.view(B, T, -1)[:, T - keep:].reshape(B * keep, -1)
    return head(model, h).view(B, keep, -1)


def picked_logits(model, h: torch.Tensor, shape: torch.Size, keep: int, rows: torch.Tensor | None) -> torch.Tensor:
    """last_logits, or with `rows` (device indices into the B*T rows of h, [B*k]: a padded prompt whose
    true length only the device knows) the logits of those rows as [B, k, V]."""
    if rows is None:
        return last_logits(model, h, shape, keep)
    logits = head(model, h.index_select(0, rows))
    return logits.view(shape[0], -1, logits.shape[-1])


def head(model, h: torch.Tensor) -> torch.Tensor:
    """The final RMSNorm and lm_head: h [M, D] -> logits [M, V]. In decode (M <= HEAD_ROWS) one GEMM
    with the norm in its prologue."""
    if h.shape[0] > HEAD_ROWS:
        return model.lm_head(group_rms_norm(h, model.norm.weight[None], eps=model.norm.eps)[0])
    return group_linear(h, model.lm_head.weight[None], norm_weight=model.norm.weight[None],
                        eps=model.norm.eps)[0]


class TritonRunner:
    """model.StepRunner on the fused kernels: h is [B*T, D]; the state is (positions [B, T], cache)."""

    def __init__(self, model):
        self.model, self.packed = model, model.packed_weights()

    def begin(self, input_ids, valid, cache: KVCache):
        return advance(cache, valid, input_ids.shape[1]), cache

    def embed(self, input_ids, state) -> torch.Tensor:
        return self.model.embed_tokens(input_ids).view(input_ids.numel(), -1)

    def stage(self, s, stage, h, state) -> torch.Tensor:
        positions, cache = state
        model, cqil = self.model, self.model.cqil
        return stage_forward(self.packed.group(stage[0], len(stage)), h, positions, cache.k[s], cache.v[s],
                             cache.key_valid, cache.start, model.inv_freq, args=model.args, bypass=cqil.bypass,
                             bypass_mode=cqil.bypass_mode)

    def end(self, h, state, keep) -> torch.Tensor:
        return last_logits(self.model, h, state[0].shape, keep)


class PaddedRunner(TritonRunner):
    """TritonRunner over a prompt padded on the right whose true length only the device knows: the logits
    of the rows `rows` (device indices into the B*T rows, [B*k]), or of every row when rows is None."""

    def __init__(self, model, rows: torch.Tensor | None):
        super().__init__(model)
        self.rows = rows

    def end(self, h, state, keep) -> torch.Tensor:
        return picked_logits(self.model, h, state[0].shape, keep, self.rows)


def padded_step(model, input_ids: torch.Tensor, valid: torch.Tensor, cache: KVCache,
                rows: torch.Tensor | None) -> torch.Tensor:
    """`step` for graphs.PrefillGraphs: input_ids [B, T] padded on the right (valid: False there) into
    `cache`; the logits of the rows `rows` [B*k] as [B, k, V] (None: of all B*T rows). Capturable."""
    return forward_step(PaddedRunner(model, rows), model.stages, input_ids, valid, cache)


def step(model, input_ids: torch.Tensor, valid: torch.Tensor | None, cache: KVCache,
         logits_to_keep: int = 0) -> torch.Tensor:
    """Append input_ids [B, T] (valid: [B, T] bool, None = all real tokens) to the cache and return the
    logits [B, T, vocab] (of the last logits_to_keep positions, 0 = all). Reads no device value on the
    host: safe to capture in a CUDA graph. The caller advances the host-side `cache.length`."""
    return forward_step(TritonRunner(model), model.stages, input_ids, valid, cache, logits_to_keep)


class TritonBackend:
    """model.Backend on the fused kernels: CUDA (or CPU tensors under TRITON_INTERPRET=1), fp32/fp16/bf16,
    no live LoRA adapters. On CUDA, graphs.py's captured graphs: cuda_graphs turns them all off or on;
    prefill_graphs those of prompts alone (decode steps replay a graph while cuda_graphs is on);
    prefill_graph_limit bounds the prompt buckets kept (graphs.MAX_GRAPHS = 64 by default, every bucket of
    one batch size: a server whose prompts fall in more buckets than it keeps runs their first two prompts
    eagerly again and again; each bucket holds its graph's memory, and the plain forwards' buckets of a batch
    size share a KV scratch as long as their longest, rounded up to a power of two: lower it where memory is
    tight)."""

    name = "triton"

    def __init__(self, cuda_graphs: bool = True, prefill_graphs: bool = True, prefill_graph_limit: int = MAX_GRAPHS):
        self.cuda_graphs, self.prefill_graphs = cuda_graphs, prefill_graphs
        self.graphs = None  # graphs.PrefillGraphs, made at the first prompt that one serves
        self.slots = None  # graphs.DecodeSlots: generate's caches and decode graphs, made at its first call
        self.prefill_graph_limit = prefill_graph_limit

    @property
    def prefill_graph_limit(self) -> int:
        return self._prefill_graph_limit

    @prefill_graph_limit.setter
    def prefill_graph_limit(self, limit: int) -> None:
        self._prefill_graph_limit = check_limit(limit)
        if self.graphs is not None:
            self.graphs.resize(limit)

    def unavailable_reason(self, model) -> str | None:
        reason = triton_unavailable_reason(model.device)
        if reason is None and model.dtype not in SUPPORTED_DTYPES:
            reason = f"the Triton kernels support float32/float16/bfloat16, not {model.dtype}"
        if reason is None and model.adapters:
            reason = ("the model has live LoRA adapters (finetune.add_lora) and the fused kernels read the packed "
                      "base weights: save the adapter and load it merged with from_pretrained(lora=DIR), or use "
                      "backend='torch'")
        return reason

    def forward(self, model, input_ids: torch.Tensor, valid: torch.Tensor | None, cache,
                logits_to_keep: int = 0, check=None) -> torch.Tensor:
        if self.cuda_graphs and self.prefill_graphs and model.device.type == "cuda" \
                and PrefillGraphs.serves(model, input_ids, cache):
            # the input check is read once the replay is queued (the bucket clamps the ids it loads)
            return self.prefill_graphs_of(model)(model, input_ids, valid, cache, logits_to_keep, check)
        if check is not None:
            check.wait()
        if cache is None:  # a plain forward: attention still reads keys from a cache, a throwaway one
            cache = model.new_cache(*input_ids.shape)
        return step(model, input_ids, valid, cache, logits_to_keep)

    def prefill_graphs_of(self, model):
        """The model's graphs.PrefillGraphs (made on first use)."""
        if self.graphs is None or self.graphs.model() is not model:
            self.graphs = PrefillGraphs(model, padded_step, limit=self.prefill_graph_limit)
        return self.graphs

    def decoder(self, model, cache, check_tokens: bool = True):
        if self.cuda_graphs and model.device.type == "cuda":
            return GraphDecoder(model, cache, functools.partial(step, model), check_tokens)
        return None

    def generation_cache(self, model, batch: int, max_seq: int):
        """On CUDA with graphs: a cache and its decode graph kept from an earlier generate (DecodeSlots)."""
        if not (self.cuda_graphs and model.device.type == "cuda"):
            return None
        if self.slots is None:
            self.slots = DecodeSlots(lambda model, cache: self.decoder(model, cache, check_tokens=False))
        return self.slots.take(model, batch, max_seq)

    def warm_up(self, model, batch: int, max_seq: int, lengths: list[int]) -> list[int]:
        """model.warm_up on this backend (graphs.warm_up): [] off CUDA or with the graphs off."""
        longest = warm_up_buckets(lengths, self.prefill_graphs, self.prefill_graph_limit)
        if not (self.cuda_graphs and model.device.type == "cuda"):
            return []
        return warm_up(model, batch, max_seq, longest, self.prefill_graphs)

    def clear_graphs(self) -> None:
        """Free every graph kept for the model: the prompt buckets and generate's caches with their decode
        graphs (made again as they are needed)."""
        for kept in (self.graphs, self.slots):
            if kept is not None:
                kept.clear()

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        return greedy(logits)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits: [B, vocab] -> argmax tokens [B] int64, first index among equal maxima: one launch on CUDA
    (ops.argmax; torch's argmax of a 49 k-entry row took 11-14 us on the H100), torch's elsewhere."""
    if (logits.is_cuda and logits.ndim == 2 and logits.stride(-1) == 1 and logits.dtype in SUPPORTED_DTYPES
            and triton_unavailable_reason(logits.device) is None):
        return row_argmax(logits)
    return logits.argmax(dim=-1)


def attach(model, cuda_graphs: bool = True, prefill_graphs: bool = True,
           prefill_graph_limit: int = MAX_GRAPHS) -> TritonBackend:
    """Attach the fused backend to `model` (a model.CQILTransformer): with backend "auto" it then runs
    on CUDA, with "triton" wherever Triton can run. Returns the backend (its `cuda_graphs` and
    `prefill_graphs` switches, its `prefill_graph_limit`)."""
    model.accelerator = TritonBackend(cuda_graphs, prefill_graphs, prefill_graph_limit)
    return model.accelerator
