"""LLaMA with CQIL groups, in plain PyTorch: the readable specification every faster backend must match.

A LLaMA layer l with input x computes
    a = Attn_l(RMSNorm_in(x));   r = x + a;   m = MLP_l(RMSNorm_post(r));   out = r + m.
A CQIL group G = [l_0 .. l_{P-1}] with input h and bypass distance d runs its layers on the SAME input:
    a_j  = Attn_{l_j}(RMSNorm_in_{l_j}(h))                  each layer attends with its own KV cache
    b_j  = a_{j-1} + ... + a_{j-min(d, j)}                  (b_0 = 0)
    "residual":  r_j = h + a_j + b_j;  m_j = MLP_{l_j}(RMSNorm_post_{l_j}(r_j));  h' = h + sum_j (a_j + b_j + m_j)
    "mlp_input": m_j = MLP_{l_j}(RMSNorm_post_{l_j}(h + a_j + b_j));          h' = h + sum_j (a_j + m_j)
Layers outside every group (and groups of one layer) run exactly as the original model.

Shapes: B batch, T new tokens, S cache length, D hidden, H query heads, Hkv key/value heads, Dh head dim,
P layers in a group.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import CQILConfig, LlamaArgs
from .generation import (PREFILL_CHUNK, InputCheck, check_inputs_late, check_logits_to_keep,
                         check_warm_up_args, generate, stream)
from .packing import LayerPacks, PackedLayers, pack_layers

BACKENDS = ("auto", "torch", "triton")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32, scale in the input dtype: the same rounding as the reference LLaMA code.
    weight broadcasts against x (fused.linear passes each layer's weight as [P, 1, D])."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


# --------------------------------------------------------------------------------------------------
# Rotary position embedding


def rope_inv_freq(args: LlamaArgs) -> torch.Tensor:
    """Inverse frequencies [Dh/2] (fp32), with the config's rope scaling (linear or llama3) applied."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    # llama3 (Llama 3.1): long wavelengths are slowed by `factor`, short ones kept, and the band between
    # original_max_position_embeddings / low_freq_factor and / high_freq_factor is interpolated.
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(in_band, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """positions: [B, T] int -> cos, sin: [B, 1, T, Dh] in `dtype` (broadcast over heads)."""
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, Dh], rotate-half convention (the HF checkpoint layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# --------------------------------------------------------------------------------------------------
# Layers


@dataclass
class StepContext:
    """What every layer of one forward step shares.

    cos, sin: [B, 1, T, Dh]. mask: [B, 1, T, S] bool (True = may attend) or None with `causal` saying
    whether plain causal masking applies. start: cache position of the first new token.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None
    causal: bool
    start: int


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            args.num_attention_heads, args.num_key_value_heads, args.head_dim)
        d, bias = args.hidden_size, args.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=bias)

    def forward(self, x: torch.Tensor, ctx: StepContext,
                cache: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """x: [B, T, D]; cache: (k, v) each [B, Hkv, S_max, Dh], written at [start, start + T)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if cache is not None:
            end = ctx.start + T
            cache[0][:, :, ctx.start:end] = k
            cache[1][:, :, ctx.start:end] = v
            k, v = cache[0][:, :, :end], cache[1][:, :, :end]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=ctx.mask, is_causal=ctx.causal,
            enable_gqa=self.n_heads != self.n_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        d, f, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def attend(self, h: torch.Tensor, ctx: StepContext, cache) -> torch.Tensor:
        return self.self_attn(self.input_layernorm(h), ctx, cache)

    def feed_forward(self, r: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.post_attention_layernorm(r))

    def forward(self, h: torch.Tensor, ctx: StepContext, cache) -> torch.Tensor:
        r = h + self.attend(h, ctx, cache)
        return r + self.feed_forward(r)


# --------------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated key/value cache, laid out by stage (a CQIL group or a single ungrouped layer).

    k[s], v[s]: [P_s, B, Hkv, S_max, Dh] for stage s of P_s layers, so the caches of one group are one
    contiguous tensor and a fused kernel can treat the group as one batched attention.
    key_valid: [B, S_max] bool, False at left-padding positions. n_tokens: [B] real tokens seen so far
    (the next token's RoPE position). length: positions filled so far (same for every row), also kept
    on the device as `position` (int32 [1]) so a captured CUDA graph can advance it; `start` (int32 [1])
    is the first slot of the Triton step in flight (ops.cache_advance moves `position` on first).
    """

    def __init__(self, args: LlamaArgs, stages: list[tuple[int, ...]], batch: int, max_seq: int,
                 device: torch.device, dtype: torch.dtype, kv_heads: list[int] | None = None):
        """kv_heads: the key/value heads each stage caches (default the config's; a tensor-parallel rank
        caches only its shard's). ValueError unless batch and max_seq are ints >= 1, max_seq within
        max_position_embeddings (the model's new_cache and a rank's both come here)."""
        check_cache_size(batch, max_seq)
        if max_seq > args.max_position_embeddings:
            raise ValueError(f"a cache of {max_seq} positions exceeds max_position_embeddings "
                             f"({args.max_position_embeddings})")
        self.stages = stages
        kv_heads = tuple(kv_heads) if kv_heads is not None else (args.num_key_value_heads,) * len(stages)
        total, self._field_bytes, self._field_at = _cache_layout(tuple(stages), kv_heads, batch, max_seq,
                                                                 args.head_dim)
        # one allocation for every layer's keys and values, not filled: a step writes every position it covers
        # (left padding and a prompt bucket's right padding included) before any kernel reads it, and attention
        # reads only positions below the step's last (masked loads, tested with the unwritten ones poisoned
        # with NaN), so zeros would be device time spent on nothing (LLaMA-7B, a 4096-position cache: 2 GiB).
        kv = allocate((2, total), dtype, torch.device(device), f"a KV cache of batch {batch} x {max_seq} positions",
                      zeroed=False)
        # The stages' tensors (k and v), the runs of equal heads and the bookkeeping's fields are views, each made
        # at its first use. A prompt replayed from a CUDA graph into a new cache (made on the host before every
        # plain prompt, whose replay waits for it) first touches them in copy_prompt, once its replay is queued.
        # The stages' 60 views of a 30-layer model were half of this constructor's time, the runs' and fields' 13
        # tensor ops 13 of the 33 us left (a CPU). Views only (no allocation, no kernel): made inside a CUDA
        # graph's capture, they are the same views.
        self._kv, self._stage_views = kv, None
        self.dtype, self.device = kv.dtype, kv.device
        self._run_heads, self._head_dim = kv_heads, args.head_dim
        self._run_views: tuple[list, list] | None = None
        # the bookkeeping, key_valid [B, S] bool, n_tokens [B] int64, position and start int32 [1], as views of
        # one buffer (each at a 16-byte boundary, as a tensor of its own would be): one allocation, one fill in
        # clear() (generate's every call), where there were four of each. The buffer is zeroed as its fields
        # are first made (_fields), so that a new cache's fill too comes after a replayed prompt is queued.
        self._bookkeeping = allocate((self._field_at[-1],), torch.uint8, torch.device(device),
                                     f"the bookkeeping of a KV cache of batch {batch} x {max_seq} positions",
                                     zeroed=False)
        self._zeroed = False
        self._field_views: tuple[torch.Tensor, ...] | None = None
        self.batch, self.max_seq, self.length = batch, max_seq, 0
        # kept for later calls (generate's, graphs.DecodeSlots): a prompt's graph may bind to this cache even
        # when it is empty, and run straight into it (no scratch of its own, nothing to copy over)
        self.long_lived = False
        # a generate or stream is running in it (generation.new_tokens): graphs.DecodeSlots does not hand it out
        self.busy = False
        # the stream that last took it from graphs.DecodeSlots, which hands it out again only to that stream
        self.stream = None

    @property
    def runs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The keys (values) of each run of consecutive stages that cache the same heads as one
        [layers, B, heads, S_max, Dh] view: one run for a whole model, a few on a tensor-parallel rank of the
        hybrid placement (shards outside the groups, whole layers inside); stages a rank does not hold (no
        heads) are left out."""
        return self._runs()[0]

    @property
    def _run_kv(self) -> list[torch.Tensor]:
        """Each run's keys and values as one [2, layers, ...] view (copy_prompt's one copy per run)."""
        return self._runs()[1]

    def _runs(self) -> tuple[list, list]:
        if self._run_views is None:
            self._run_views = self._made_as_the_buffers_were(self._make_runs)
        return self._run_views

    def _made_as_the_buffers_were(self, make):
        """make()'s views of the buffers, made as the constructor would have made them: normal tensors of normal
        buffers even when first asked for under inference_mode (generate's), where a view would be one that no
        in-place update outside it may touch (clear(), copy_prompt)."""
        with torch.inference_mode(self._bookkeeping.is_inference()):
            return make()

    def _make_runs(self) -> tuple[list, list]:
        runs, pairs, offset = [], [], 0
        for heads, run in itertools.groupby(zip(self.stages, self._run_heads), key=lambda pair: pair[1]):
            layers = (sum(len(stage) for stage, _ in run), self.batch, heads, self.max_seq, self._head_dim)
            size = math.prod(layers)
            if size:
                pair = self._kv[:, offset:offset + size].view(2, *layers)
                pairs.append(pair)
                runs.append((pair[0], pair[1]))
            offset += size
        return runs, pairs

    def _fields(self) -> tuple[torch.Tensor, ...]:
        """(key_valid, n_tokens, position, start): views of the bookkeeping buffer, made once; the buffer is
        zeroed then (a kernel: RuntimeError where that would be recorded into a CUDA graph's capture, whose
        every replay would then empty the cache)."""
        if self._field_views is None:
            self._field_views = self._made_as_the_buffers_were(self._make_fields)
        return self._field_views

    def _make_fields(self) -> tuple[torch.Tensor, ...]:
        if not self._zeroed:  # in the buffer's own mode (_made_as_the_buffers_were), as the constructor did
            if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("a new KV cache's bookkeeping was first used inside a CUDA graph capture, "
                                   "which would record its zeroing: use the cache (or clear() it) before")
            self._bookkeeping.zero_()
            self._zeroed = True
        key_valid, n_tokens, position, start = (self._bookkeeping[a:a + n]
                                                for a, n in zip(self._field_at, self._field_bytes))
        return (key_valid.view(torch.bool).view(self.batch, self.max_seq), n_tokens.view(torch.int64),
                position.view(torch.int32), start.view(torch.int32))

    key_valid = property(lambda self: self._fields()[0],
                         doc="[B, S_max] bool: False at left-padding positions and at positions not filled yet.")
    n_tokens = property(lambda self: self._fields()[1],
                        doc="[B] int64: each row's real tokens so far (its next token's RoPE position).")
    position = property(lambda self: self._fields()[2],
                        doc="int32 [1]: positions filled so far, on the device (a captured graph advances it).")
    start = property(lambda self: self._fields()[3], doc="int32 [1]: the first slot of the Triton step in flight.")

    @property
    def k(self) -> list[torch.Tensor]:
        """The keys of each stage, k[s]: [P_s, B, Hkv, S_max, Dh] (views of the one allocation)."""
        return self._views()[0]

    @property
    def v(self) -> list[torch.Tensor]:
        """The values of each stage, as k."""
        return self._views()[1]

    def _views(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The stages' keys and values, made once: each run of consecutive stages of one shape by one view and
        one unbind."""
        if self._stage_views is None:
            self._stage_views = self._made_as_the_buffers_were(self._make_stage_views)
        return self._stage_views

    def _make_stage_views(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ks, vs = [], []
        offset = 0
        shapes = [(len(s), self.batch, h, self.max_seq, self._head_dim) for s, h in zip(self.stages, self._run_heads)]
        for shape, run in itertools.groupby(shapes):
            n = len(list(run))
            size = n * math.prod(shape)
            ks.extend(self._kv[0, offset:offset + size].view(n, *shape).unbind(0))
            vs.extend(self._kv[1, offset:offset + size].view(n, *shape).unbind(0))
            offset += size
        return ks, vs

    def layer(self, stage: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer j of stage `stage`: (k, v), each [B, Hkv, S_max, Dh]."""
        return self.k[stage][j], self.v[stage][j]

    def nbytes(self) -> int:
        """The memory of its keys and values."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def clear(self) -> None:
        """Forget every position (the buffers stay): the cache is empty again, as a new one is (the old
        keys and values are left in place, marked invalid, and overwritten as positions are filled)."""
        self._bookkeeping.zero_()  # key_valid, n_tokens, position and start
        self._zeroed = True
        self.length = 0

    def restore(self) -> None:
        """Bring the device's bookkeeping back to the host's `length` positions, after a step that did not
        complete (an exception or an interrupt between its first launch and the host's `length += T`: out of
        memory part-way, Ctrl-C). The step's kernels take their first slot from the device's `position`, the
        room checks read the host's `length`: left apart, the next step would write past what the host
        checked, past the cache's end at worst. Positions from `length` on are free again (their keys and
        values stay, to be overwritten); each row's token count is recounted from what stays. The model's
        forward and the decode steps call it when they fail; a device that has failed itself (a CUDA error)
        fails this too."""
        L = self.length
        self.key_valid[:, L:] = False
        torch.sum(self.key_valid[:, :L], dim=1, out=self.n_tokens)
        self.position.fill_(L)
        self.start.fill_(L)

    def copy_prompt(self, src: KVCache, length: int) -> None:
        """Take the first `length` positions of every layer and their bookkeeping from `src`, a cache of the
        same layout and batch (any max_seq) that was filled from position 0: this cache must be empty. The
        prefill graphs (graphs.py) run a prompt into a cache of their own and hand it over this way. The
        host-side `length` is left to the caller, as after a forward step."""
        if self.length != 0:
            raise ValueError(f"copy_prompt fills an empty cache; this one holds {self.length} positions")
        if (src.stages != self.stages or src.batch != self.batch or len(src.runs) != len(self.runs)
                or any(a.shape[::2] != b.shape[::2] or a.dtype != b.dtype or a.device != b.device
                       for (a, _), (b, _) in zip(src.runs, self.runs))):
            raise ValueError("copy_prompt needs a cache of the same stages, batch, heads and dtype")
        if not 0 < length <= min(src.max_seq, self.max_seq):
            raise ValueError(f"length must be in [1, {min(src.max_seq, self.max_seq)}], got {length}")
        for kv, kv_src in zip(self._run_kv, src._run_kv):  # keys and values of a run in one copy
            _as_words(kv[..., :length, :]).copy_(_as_words(kv_src[..., :length, :]))
        self.key_valid[:, :length].copy_(src.key_valid[:, :length])
        self.n_tokens.copy_(src.n_tokens)
        self.position.fill_(length)


def check_cache_size(batch, max_seq) -> None:
    """ValueError unless a KV cache's batch and max_seq are ints >= 1."""
    for name, value in (("batch", batch), ("max_seq", max_seq)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"a KV cache's {name} must be an int >= 1, got {value!r}")


@functools.lru_cache(maxsize=64)
def _cache_layout(stages: tuple[tuple[int, ...], ...], kv_heads: tuple[int, ...], batch: int, max_seq: int,
                  head_dim: int) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """A KVCache's layout, the same for every cache of these arguments (made once: a new cache comes before
    every plain prompt): the elements of its keys (or values), its bookkeeping fields' bytes and their
    offsets in the bookkeeping buffer (each at a 16-byte boundary; the last entry is the buffer's size)."""
    total = batch * max_seq * head_dim * sum(len(stage) * heads for stage, heads in zip(stages, kv_heads))
    field_bytes = (batch * max_seq, 8 * batch, 4, 4)
    at = [0]
    for nbytes in field_bytes:
        at.append(at[-1] + -(-nbytes // 16) * 16)
    return total, field_bytes, tuple(at)


def _as_words(rows: torch.Tensor) -> torch.Tensor:
    """rows [..., D] (contiguous rows, every other stride a multiple of D) viewed as the widest integer words
    that tile a row (RoPE's even head_dim: at least 4 bytes): the same bytes, copied bit for bit. A copy into
    a cache's first positions is strided (the caches' lengths differ), and torch's copy kernel moves wide
    elements faster: one H100, LLaMA-7B's 2048-token prompt (1.07 GB of keys and values), 1301 us as bf16,
    712 as int64 words (graph_launch_llama-7b_h100_2d10967)."""
    row = rows.shape[-1] * rows.element_size()
    for word in (torch.int64, torch.int32, torch.int16):
        if word.itemsize >= rows.element_size() and row % word.itemsize == 0:
            return rows.view(word)
    return rows


def allocate(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, what: str,
             zeroed: bool = True) -> torch.Tensor:
    """A tensor of `shape` on `device` (zeros, or left as the allocator hands it out), or MemoryError naming
    `what` when it does not fit: on a GPU, torch's out-of-memory error turned into one (no query before
    allocating: reading the allocator's counters was 0.55 of the 1.6 ms a replayed SmolLM2 prompt took on
    the host, under cProfile on the H100 at 42b5305); on the host, checked against the available memory
    before allocating (check_fits)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cuda":
        check_fits(nbytes, device, what)
    try:
        return (torch.zeros if zeroed else torch.empty)(shape, device=device, dtype=dtype)
    except torch.OutOfMemoryError as e:
        free = torch.cuda.mem_get_info(device)[0]
        raise MemoryError(f"{what} needs {nbytes / 2**30:.2f} GiB, more than the {free / 2**30:.2f} GiB free on "
                          f"{device} ({str(e).splitlines()[0]})") from None


def check_fits(nbytes: int, device: torch.device, what: str) -> None:
    """MemoryError naming `what` when nbytes is more than the host's available memory (device "cpu"): a host
    that overcommits would otherwise hand out the pages and kill the process once they are touched. Other
    devices are not checked here (allocate: a GPU's own out-of-memory error says it)."""
    free = _host_available_bytes() if device.type == "cpu" else None
    if free is not None and nbytes > free:
        raise MemoryError(f"{what} needs {nbytes / 2**30:.2f} GiB, more than the {free / 2**30:.2f} GiB "
                          f"available on {device}")


def _host_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), else None (not checked)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_forward_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         cache: KVCache | None, late: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor | None, InputCheck | None]:
    """What forward() checks of its inputs before anything runs (one read of the device), for the model and for
    a rank of a multi-GPU run (parallel/rank.py): token ids within the vocabulary and the mask (a row of
    padding only allowed with a cache). Returns (input_ids on model.device, the checked mask, None), or with
    late, where the inputs are on a CUDA device, an InputCheck of the values still to be read in place of None
    (check_inputs_late). forward_checked, which forward() then runs, checks the cache (check_cache_fits)."""
    return check_inputs_late(input_ids, model.args.vocab_size, attention_mask, empty_rows=cache is not None,
                             device=model.device, late=late)


def check_is_cache(cache) -> None:
    """TypeError unless `cache` is a KVCache (a decoder's, a forward's where one is given)."""
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache (model.new_cache), got {type(cache).__name__}")


def check_cache_fits(model, shape: tuple[int, int], cache: KVCache | None) -> None:
    """What forward_checked checks on the host before anything runs: T new positions of a [B, T] input fit
    the cache (or max_position_embeddings without one), and the cache fits `model` (its `args`, `stages`,
    `dtype`, `device`)."""
    if cache is not None:
        check_is_cache(cache)
    B, T = shape
    end = T + (cache.length if cache is not None else 0)
    limit = cache.max_seq if cache is not None else model.args.max_position_embeddings
    if end > limit:
        what = "the KV cache" if cache is not None else "max_position_embeddings"
        raise ValueError(f"{end} positions exceed {what} ({limit})")
    if cache is None:
        return
    if B != cache.batch:
        raise ValueError(f"input batch {B} does not match the KV cache's batch {cache.batch}")
    if cache.stages != model.stages:
        raise ValueError("this KV cache was made for another CQIL grouping (or another rank); make a new one "
                         "with model.new_cache() after changing model.cqil")
    if cache.dtype != model.dtype or cache.device != model.device:
        raise ValueError(f"this KV cache holds {cache.dtype} on {cache.device}, the model "
                         f"{model.dtype} on {model.device}; make a new one with model.new_cache()")


# --------------------------------------------------------------------------------------------------
# One forward step: the loop over stages, written once for every backend


class StepRunner(Protocol):
    """How a backend runs one forward step: this file's torch path (TorchRunner), the fused kernels
    (fused.py) and a rank of a multi-GPU run (parallel/rank.py) each implement it; forward_step holds the
    loop they share."""

    def begin(self, input_ids: torch.Tensor, valid: torch.Tensor | None, cache: KVCache | None) -> Any:
        """Positions, masks and the cache's bookkeeping for the new tokens: the state `stage` and `end`
        receive."""

    def embed(self, input_ids: torch.Tensor, state: Any) -> Any:
        """The hidden state entering the first stage."""

    def stage(self, s: int, stage: tuple[int, ...], h: Any, state: Any) -> Any:
        """Stage s (a group, or one ungrouped layer) on h."""

    def end(self, h: Any, state: Any, keep: int) -> torch.Tensor:
        """The logits [B, keep, vocab] of the last `keep` of the T positions of the last stage's output."""


def forward_step(runner: StepRunner, stages, input_ids: torch.Tensor, valid: torch.Tensor | None,
                 cache: KVCache | None, logits_to_keep: int = 0) -> torch.Tensor:
    """input_ids [B, T] through every stage in order, with `runner`'s way of running each; the new tokens'
    keys and values go into the cache (if any), whose host-side `length` the caller advances (a CUDA
    graph replays this step without running the host code). Inputs already checked. Returns the logits
    of the last `logits_to_keep` positions [B, k, vocab] (0: all T)."""
    T = input_ids.shape[1]
    state = runner.begin(input_ids, valid, cache)
    h = runner.embed(input_ids, state)
    for s, stage in enumerate(stages):
        h = runner.stage(s, stage, h, state)
    return runner.end(h, state, min(logits_to_keep, T) or T)


class TorchRunner:
    """The readable reference: each layer's modules as written above; a group as in the module docstring."""

    def __init__(self, model: CQILTransformer):
        self.model = model

    def begin(self, input_ids, valid, cache) -> tuple[StepContext, KVCache | None]:
        ctx = self.model.step_context(input_ids, valid, cache)
        if cache is not None:
            cache.position.add_(input_ids.shape[1])
        return ctx, cache

    def embed(self, input_ids, state) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def stage(self, s, stage, h, state) -> torch.Tensor:
        ctx, cache = state
        if len(stage) == 1:
            return self.model.layers[stage[0]](h, ctx, cache.layer(s, 0) if cache is not None else None)
        return self.group(s, stage, h, ctx, cache)

    def group(self, s, stage, h, ctx, cache) -> torch.Tensor:
        """One CQIL group: every layer reads h; returns h' (see the module docstring)."""
        model = self.model
        layers = [model.layers[i] for i in stage]
        attn = [layer.attend(h, ctx, cache.layer(s, j) if cache is not None else None)
                for j, layer in enumerate(layers)]
        d, residual = model.cqil.bypass, model.cqil.bypass_mode == "residual"
        deltas = []
        for j, layer in enumerate(layers):
            a = attn[j] + sum(attn[max(0, j - d):j])  # a_j + b_j (sum of nothing is 0)
            m = layer.feed_forward(h + a)
            deltas.append((a if residual else attn[j]) + m)
        return h + sum(deltas)

    def end(self, h, state, keep) -> torch.Tensor:
        return self.model.lm_head(self.model.norm(h[:, h.shape[1] - keep:]))


class Backend(Protocol):
    """A faster way to run the model, attached to it from outside (fused.attach): the model asks it
    whether it can run, then hands it the step."""

    name: str

    def unavailable_reason(self, model: CQILTransformer) -> str | None:
        """None when it can run the model now, else why not."""

    def forward(self, model: CQILTransformer, input_ids: torch.Tensor, valid: torch.Tensor | None,
                cache: KVCache | None, logits_to_keep: int, check: InputCheck | None = None) -> torch.Tensor:
        """CQILTransformer.forward with the inputs checked, or their values still to be read (check: its wait()
        raises where they are bad, called before anything reads the ids unless what reads them is safe for any
        id); the model advances cache.length afterwards, and restores the cache where this raises."""

    def decoder(self, model: CQILTransformer, cache: KVCache, check_tokens: bool = True):
        """A decode step next_tokens [B] -> logits [B, vocab] for `cache` (e.g. a CUDA graph replay), or
        None for the plain forward; check_tokens as CQILTransformer.decoder's."""

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, vocab] -> greedy tokens [B] int64 (the first index among equal maxima)."""

    def generation_cache(self, model: CQILTransformer, batch: int, max_seq: int):
        """generate's (empty KV cache of at least max_seq positions, its decode step), e.g. kept from an
        earlier call with its captured graph, or None for a new cache and decoder()."""

    def warm_up(self, model: CQILTransformer, batch: int, max_seq: int, lengths: list[int]) -> list[int]:
        """Make ready what generate will run for `batch` rows, up to max_seq positions and prompts of these
        lengths (e.g. compile and capture its steps); returns the prompt lengths (buckets) made ready."""


# --------------------------------------------------------------------------------------------------
# The model


class CQILTransformer(nn.Module):
    """A LLaMA-family causal LM whose CQIL groups run on a shared input, in plain PyTorch.

    Parameter names follow transformers' LlamaForCausalLM without the "model." prefix, so HF state
    dicts load directly. `model.cqil` can be changed at any time (the weights are the same; only the
    execution of grouped layers changes). cqil_kernels.CQILLlama adds loading and the fused backend.

    held_layers: the layers whose weights this process holds (None: all); a rank of a multi-GPU run holds
    only its own layer of each group (parallel/placement.py), the others stay on "meta".
    layer_args: layer -> the LlamaArgs its modules are built with (default `args`): a tensor-parallel
    rank's layers are shards, with fewer heads and a smaller intermediate size.
    """

    def __init__(self, args: LlamaArgs, cqil: CQILConfig | None = None, held_layers=None, layer_args=None):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        layer_args = layer_args if layer_args is not None else (lambda layer: args)
        self.layers = nn.ModuleList(DecoderLayer(layer_args(layer)) for layer in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self.cqil = cqil
        if held_layers is not None:
            bad = [i for i in held_layers if not 0 <= i < args.num_hidden_layers]
            if bad:
                raise ValueError(f"held_layers: layer {bad[0]} is outside the model ({args.num_hidden_layers} "
                                 f"layers)")
            held_layers = tuple(sorted(set(held_layers)))
        self.held_layers: tuple[int, ...] | None = held_layers
        # The layer weights packed layer-major (packing.py; pack()), shared with the layers' parameters.
        self.packed: PackedLayers | LayerPacks | None = None
        # A faster backend attached from outside (fused.attach); None: this file's torch path only.
        self.accelerator: Backend | None = None
        # Live LoRA adapters wrapped around the projections (finetune.add_lora fills it): the fused
        # backend, which reads the packed base weights, does not run while any is live.
        self.adapters: dict = {}
        self.backend = "auto"

    # ----------------------------------------------------------------------------------------------

    @property
    def cqil(self) -> CQILConfig:
        return self._cqil

    @cqil.setter
    def cqil(self, cqil: CQILConfig | None) -> None:
        cqil = cqil if cqil is not None else CQILConfig()
        if not isinstance(cqil, CQILConfig):
            raise TypeError(f"cqil must be a CQILConfig or None, got {type(cqil).__name__}")
        self.stages = cqil.stages(self.args.num_hidden_layers)  # validates against this model
        self._cqil = cqil

    @contextlib.contextmanager
    def grouping(self, cqil: CQILConfig):
        """`with model.grouping(cqil):` runs with that grouping and restores the current one afterwards."""
        saved = self.cqil
        try:
            self.cqil = cqil
            yield self
        finally:
            self.cqil = saved

    @property
    def backend(self) -> str:
        """"torch" (this file, the readable reference), "triton" (the attached fused backend, fused.py) or
        "auto": the attached backend on CUDA where it can run, else torch."""
        return self._backend

    @backend.setter
    def backend(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self._backend = backend

    def accelerated(self) -> bool:
        """Whether forward() runs the attached backend now; ValueError when backend="triton" cannot run."""
        if self._backend == "torch":
            return False
        if self.accelerator is None:
            if self._backend == "triton":
                raise ValueError("backend='triton' cannot run: no fused backend is attached to this model (load "
                                 "it with CQILLlama.from_pretrained, or call cqil_kernels.fused.attach(model))")
            return False
        reason = self.accelerator.unavailable_reason(self)
        if self._backend == "triton" and reason is not None:
            raise ValueError(f"backend='triton' cannot run: {reason}")
        return reason is None and (self._backend == "triton" or self.device.type == "cuda")

    @property
    def device(self) -> torch.device:
        return self._weight("embed_tokens").device

    @property
    def dtype(self) -> torch.dtype:
        return self._weight("embed_tokens").dtype

    def _weight(self, module: str) -> torch.Tensor:
        """self.<module>.weight, looked up in the modules' own tables: nn.Module's attribute fallback costs
        ~0.5 us a level (a CPU), and a replayed prompt's forward reads a dozen of these before its replay
        (device, dtype, the graph signature)."""
        try:
            return self._modules[module]._parameters["weight"]
        except KeyError:  # a module replaced by one whose weight is not a parameter of its own
            return getattr(self, module).weight

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() would round the RoPE frequencies to 16 bits; keep them fp32 and recomputed
        super()._apply(fn, recurse)
        if self.embed_tokens.weight.device.type != "meta":
            self.reset_rope()
        return self

    def reset_rope(self) -> None:
        """(Re)compute the RoPE frequency buffer on the model's device, e.g. after building on "meta"."""
        self.inv_freq = rope_inv_freq(self.args).to(self.device)

    def pack(self, device: torch.device | None = None, dtype: torch.dtype | None = None,
             copy: bool = True) -> PackedLayers | LayerPacks:
        """Pack the held layers' weights layer-major (packing.py) and rebind their parameters to views of
        the packed tensors; copy=False leaves them uninitialised, for a loader to fill."""
        with torch.no_grad():
            self.packed = pack_layers(self.layers, device, dtype, copy=copy, layer_ids=self.held_layers)
        return self.packed

    def packed_weights(self) -> PackedLayers | LayerPacks:
        """The packed layer weights, (re)packed if the parameters were moved or replaced since."""
        if self.packed is None or not self.packed.is_current():
            self.pack()
        return self.packed

    def graph_signature(self, scan: bool = True) -> tuple:
        """What a captured CUDA graph of a step reads besides its own buffers (graphs.PrefillGraphs): the
        packed weights (a regrouping keeps them, a repack or a move replaces them), the grouping, the
        other weights' storage. A graph captured under another signature must not be replayed.
        scan=False: the packed weights as last packed, without the scan of their bindings that finds a
        parameter replaced by hand (PackedLayers.is_current: ~60 of the ~70 us the whole check took in a GPU
        host's Python for SmolLM2's 270 bindings); PrefillGraphs runs that scan while a replay runs."""
        embed = self._weight("embed_tokens")
        return (id(self.packed_weights() if scan else self.packed), self.stages, self._cqil, embed.dtype, embed.device,
                embed.data_ptr(), self._weight("lm_head").data_ptr(), self._weight("norm").data_ptr(),
                self._buffers["inv_freq"].data_ptr())

    def new_cache(self, batch: int, max_seq: int) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `max_seq` positions, in this grouping's layout."""
        return KVCache(self.args, self.stages, batch, max_seq, self.device, self.dtype)

    # ----------------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """input_ids: [B, T] -> logits [B, T, vocab].

        attention_mask: [B, T], 1 for real tokens, 0 for left padding (optional). With `cache`, the new
        tokens are appended to it (and attend to everything cached; a row may then be all padding, as
        in the first part of a left-padded prompt fed in parts); without, a full causal forward.
        logits_to_keep: only the last k positions' logits [B, k, vocab] (0: all), as in transformers; a
        prefill needs only the last one, and the others cost T x vocab x hidden multiply-adds.
        A forward that fails part-way (out of memory, an interrupt) leaves the cache as it was; so does one
        refused for ids outside the vocabulary or a bad mask (ValueError), which on CUDA a prompt replayed from
        a graph reports once its replay is queued.
        """
        # the values of CUDA inputs are read once the prompt's work is queued (forward_checked): the host does not
        # wait for the GPU before the replay of a prompt graph
        input_ids, attention_mask, check = check_forward_inputs(self, input_ids, attention_mask, cache, late=True)
        return self.forward_checked(input_ids, attention_mask, cache, check_logits_to_keep(logits_to_keep), check)

    # forward_checked takes an InputCheck (generation.generate passes generate's own)
    late_input_checks = True

    def forward_checked(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache | None,
                        keep: int, check: InputCheck | None = None) -> torch.Tensor:
        """forward() of inputs already checked as check_inputs returns them (int64 ids within the vocabulary on
        this model's device, a bool mask or None) and logits_to_keep `keep`: generate checks its whole prompt
        once (one read of the device) and runs its parts through here. The cache's fit is checked again (on
        the host only). check: the value checks of the inputs still to be read (generation.InputCheck): the
        attached backend waits for them once its work is queued where that work is safe for any id (a prompt
        graph's replay), else before it runs; when they fail, the cache is restored and their ValueError
        raised."""
        check_cache_fits(self, input_ids.shape, cache)
        try:
            if self.accelerated():
                logits = self.accelerator.forward(self, input_ids, attention_mask, cache, keep, check)
            else:
                if check is not None:
                    check.wait()
                logits = forward_step(TorchRunner(self), self.stages, input_ids, attention_mask, cache, keep)
        except BaseException:  # an interrupt too: the cache holds what it held before (KVCache.restore)
            if cache is not None:
                cache.restore()
            raise
        if cache is not None:
            cache.length += input_ids.shape[1]
        return logits

    def step_context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     cache: KVCache | None) -> StepContext:
        """RoPE tables and the attention mask of T new tokens; records them in the cache's bookkeeping
        (key_valid, n_tokens)."""
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        end = start + T

        valid = (attention_mask.bool() if attention_mask is not None
                 else torch.ones(B, T, dtype=torch.bool, device=input_ids.device))
        # Left padding: a row's first real token gets position 0.
        before = cache.n_tokens[:, None] if cache is not None else 0
        positions = (before + valid.long().cumsum(1) - 1).clamp(min=0)
        if cache is not None:
            cache.key_valid[:, start:end] = valid
            cache.n_tokens.add_(valid.long().sum(1))
            key_valid = cache.key_valid[:, :end]
        else:
            key_valid = valid
        cos, sin = rope_cos_sin(self.inv_freq, positions, self.dtype)

        if bool(key_valid.all()):
            if start == 0:
                return StepContext(cos, sin, None, T > 1, start)
            if T == 1:
                return StepContext(cos, sin, None, False, start)
        q_pos = torch.arange(start, end, device=input_ids.device)[:, None]
        k_pos = torch.arange(end, device=input_ids.device)[None, :]
        # Padding keys are masked out; a padding query still attends to itself so no row is empty
        # (its output is never used).
        mask = (k_pos <= q_pos) & (key_valid[:, None, :] | (k_pos == q_pos))
        return StepContext(cos, sin, mask[:, None], False, start)

    def decoder(self, cache: KVCache, check_tokens: bool = True):
        """A function next_tokens [B] -> logits [B, vocab] that appends one token per row to `cache`:
        the attached backend's (a CUDA graph replay for the fused one; its logits are overwritten by the
        next call) or a plain forward. check_tokens: refuse token ids outside the vocabulary, which costs a
        read of the device every step; pass False only for tokens the model chose itself (generate's)."""
        check_is_cache(cache)
        if self.accelerated():
            decode = self.accelerator.decoder(self, cache, check_tokens)
            if decode is not None:
                return decode
        if check_tokens:
            return lambda next_tokens: self(next_tokens[:, None], cache=cache)[:, -1]
        return lambda next_tokens: self.forward_checked(next_tokens[:, None], None, cache, 0)[:, -1]

    def generation_cache(self, batch: int, max_seq: int):
        """generate's KV cache and decode step: (an empty cache of at least max_seq positions, a function
        next_tokens [B] -> logits [B, vocab] appending to it). With CUDA graphs (the fused backend on CUDA)
        a cache and its captured decode graph kept from an earlier call (graphs.DecodeSlots), handed out busy
        (KVCache.busy): the caller lets it go when its generation ends, or no later call takes that cache again
        (generation.generation_slot, which generate takes it through, does both); else a new cache and
        decoder(cache)."""
        if self.accelerated():
            slot = self.accelerator.generation_cache(self, batch, max_seq)
            if slot is not None:
                return slot
        cache = self.new_cache(batch, max_seq)
        return cache, self.decoder(cache, check_tokens=False)

    def warm_up(self, batch: int = 1, max_seq: int | None = None, prompt_lengths=None) -> list[int]:
        """Make generate ready for requests of `batch` rows and up to `max_seq` positions each (prompt + new
        tokens; default max_position_embeddings) before the first one comes, as serving engines do when they
        start: the attached backend compiles and captures now what it would otherwise do on the first calls.
        With the fused backend on CUDA, generate's kept KV cache is made, and its decode step and the prompt
        bucket of each of `prompt_lengths` (default: every length one forward takes, up to
        min(max_seq - 1, 4096)) are captured as CUDA graphs; without, a bucket's first two prompts and a
        new cache's first two decode steps run their kernels one launch at a time from Python. Returns the
        prompt buckets made ready ([] where there is nothing to capture: the torch backend, the CPU). What is
        captured is for the current grouping and weights: changing either drops it (graph_signature)."""
        max_seq, lengths = check_warm_up_args(self.args, batch, max_seq, prompt_lengths)
        if not self.accelerated():
            return []
        return self.accelerator.warm_up(self, batch, max_seq, lengths)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Greedy decoding's choice: logits [B, vocab] -> tokens [B] int64, the first index among equal
        maxima (the attached backend's kernel where it runs, torch's argmax otherwise)."""
        if self.accelerated():
            return self.accelerator.argmax(logits)
        return logits.argmax(dim=-1)

    # ----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | list[int] | None = None,
                 attention_mask: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, seed: int | None = None,
                 prefill_chunk: int | None = PREFILL_CHUNK) -> torch.Tensor:
        """Continue each prompt by up to `max_new_tokens` tokens with a KV cache.

        input_ids: [B, T] (left-padded when B > 1, with `attention_mask` [B, T] marking real tokens).
        Greedy unless do_sample; sampling uses temperature, then top_k, then top_p (nucleus), drawing
        from `generator` (or a new one seeded with `seed`). Rows that produced an eos token are filled
        with that eos token afterwards; generation stops early when every row has finished.
        prefill_chunk: the prompt goes into the cache this many positions per forward (default 4096;
        None: all at once), which bounds the memory a long prompt needs.
        Returns [B, T + n] token ids with n <= max_new_tokens.
        """
        return generate(self, input_ids, max_new_tokens, do_sample=do_sample, temperature=temperature,
                        top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                        attention_mask=attention_mask, generator=generator, seed=seed,
                        prefill_chunk=prefill_chunk)

    def stream(self, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool = False,
               temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
               eos_token_id: int | list[int] | None = None,
               attention_mask: torch.Tensor | None = None,
               generator: torch.Generator | None = None, seed: int | None = None,
               prefill_chunk: int | None = PREFILL_CHUNK) -> Iterator[torch.Tensor]:
        """generate's new tokens as they are made: an iterator of one [B] int64 CPU tensor per step, each
        row's next token (a row that has finished gives its eos), ending after max_new_tokens steps or once
        every row has finished; the tokens it gives are those generate returns after the prompt. The
        arguments are generate's, checked when stream is called. On CUDA the next step runs on the GPU while
        the host takes a step's tokens. A stream holds its KV cache until it is exhausted or dropped: a
        generate or stream called meanwhile makes a cache of its own."""
        return stream(self, input_ids, max_new_tokens, do_sample=do_sample, temperature=temperature,
                      top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                      attention_mask=attention_mask, generator=generator, seed=seed,
                      prefill_chunk=prefill_chunk)
