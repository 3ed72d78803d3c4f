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
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import CQILConfig, LlamaArgs
from .generation import check_attention_mask, check_input_ids, generate

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
                 device: torch.device, dtype: torch.dtype):
        shape = (batch, args.num_key_value_heads, max_seq, args.head_dim)
        self.stages = stages
        # one allocation and one fill for every layer's keys and values; the stages' tensors are views.
        sizes = [len(s) for s in stages]
        k, v = torch.zeros((2, sum(sizes), *shape), device=device, dtype=dtype)
        self.k, self.v = list(k.split(sizes)), list(v.split(sizes))
        self.key_valid = torch.zeros(batch, max_seq, dtype=torch.bool, device=device)
        self.n_tokens = torch.zeros(batch, dtype=torch.int64, device=device)
        self.position = torch.zeros(1, dtype=torch.int32, device=device)
        self.start = torch.zeros(1, dtype=torch.int32, device=device)
        self.batch, self.max_seq, self.length = batch, max_seq, 0

    def layer(self, stage: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer j of stage `stage`: (k, v), each [B, Hkv, S_max, Dh]."""
        return self.k[stage][j], self.v[stage][j]


# --------------------------------------------------------------------------------------------------
# The model


def check_forward_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         cache: KVCache | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What forward() checks before anything runs, for CQILLlama and for a rank of a multi-GPU run
    (parallel/rank.py): token ids within the vocabulary, the mask, and a cache that fits `model` (its
    `args`, `stages`, `dtype`, `device`). Returns (input_ids on model.device, the checked mask)."""
    input_ids = check_input_ids(input_ids, model.args.vocab_size).to(model.device)
    if attention_mask is not None:
        attention_mask = check_attention_mask(attention_mask, input_ids)
    B, T = input_ids.shape
    end = T + (cache.length if cache is not None else 0)
    limit = cache.max_seq if cache is not None else model.args.max_position_embeddings
    if end > limit:
        what = "the KV cache" if cache is not None else "max_position_embeddings"
        raise ValueError(f"{end} positions exceed {what} ({limit})")
    if cache is None:
        return input_ids, attention_mask
    if B != cache.batch:
        raise ValueError(f"input batch {B} does not match the KV cache's batch {cache.batch}")
    if cache.stages != model.stages:
        raise ValueError("this KV cache was made for another CQIL grouping (or another rank); make a new one "
                         "with model.new_cache() after changing model.cqil")
    if cache.k[0].dtype != model.dtype or cache.k[0].device != model.device:
        raise ValueError(f"this KV cache holds {cache.k[0].dtype} on {cache.k[0].device}, the model "
                         f"{model.dtype} on {model.device}; make a new one with model.new_cache()")
    return input_ids, attention_mask


class CQILLlama(nn.Module):
    """A LLaMA-family causal LM whose CQIL groups run on a shared input.

    Parameter names follow transformers' LlamaForCausalLM without the "model." prefix, so HF state
    dicts load directly. Build it with `CQILLlama.from_pretrained(...)`; `model.cqil` can be changed at
    any time (the weights are the same; only the execution of grouped layers changes).
    """

    def __init__(self, args: LlamaArgs, cqil: CQILConfig | None = None):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self.cqil = cqil
        self.backend = "auto"
        self.cuda_graphs = True  # generate() replays decode steps from a CUDA graph (Triton backend)
        self.packed_layers = None  # set by the loaders / the Triton backend (packing.py)
        # The layers whose weights this process holds (None: all). A rank of a multi-GPU run
        # (parallel/) holds only its own layer of each group; the others stay on "meta".
        self.held_layers: tuple[int, ...] | None = None

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
        """"torch" (this file, the readable reference), "triton" (fused kernels, fused.py) or "auto":
        Triton on CUDA when it is installed and the dtype is fp16/bf16/fp32, else torch."""
        return self._backend

    @backend.setter
    def backend(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self._backend = backend

    def uses_triton(self) -> bool:
        """Whether forward() runs the Triton backend now; ValueError when "triton" cannot run here."""
        if self._backend == "torch":
            return False
        from .ops._common import SUPPORTED_DTYPES, triton_unavailable_reason

        reason = triton_unavailable_reason(self.device)
        if reason is None and self.dtype not in SUPPORTED_DTYPES:
            reason = f"the Triton kernels support float32/float16/bfloat16, not {self.dtype}"
        if reason is None and getattr(self, "lora_adapters", None):
            reason = ("the model has live LoRA adapters (finetune.add_lora) and the fused kernels read the packed "
                      "base weights: save the adapter and load it merged with from_pretrained(lora=DIR), or use "
                      "backend='torch'")
        if self._backend == "triton" and reason is not None:
            raise ValueError(f"backend='triton' cannot run: {reason}")
        return reason is None and (self._backend == "triton" or self.device.type == "cuda")

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() would round the RoPE frequencies to 16 bits; keep them fp32 and recomputed
        super()._apply(fn, recurse)
        if self.embed_tokens.weight.device.type != "meta":
            self.reset_rope()
        return self

    def reset_rope(self) -> None:
        """(Re)compute the RoPE frequency buffer on the model's device, e.g. after building on "meta"."""
        self.inv_freq = rope_inv_freq(self.args).to(self.device)

    def new_cache(self, batch: int, max_seq: int) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `max_seq` positions, in this grouping's layout."""
        if max_seq > self.args.max_position_embeddings:
            raise ValueError(
                f"a cache of {max_seq} positions exceeds max_position_embeddings "
                f"({self.args.max_position_embeddings})")
        return KVCache(self.args, self.stages, batch, max_seq, self.device, self.dtype)

    # ----------------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """input_ids: [B, T] -> logits [B, T, vocab].

        attention_mask: [B, T], 1 for real tokens, 0 for left padding (optional). With `cache`, the new
        tokens are appended to it (and attend to everything cached); without, a full causal forward.
        """
        input_ids, attention_mask = check_forward_inputs(self, input_ids, attention_mask, cache)
        if self.uses_triton():
            from . import fused

            return fused.forward(self, input_ids, attention_mask, cache)
        ctx = self._step_context(input_ids, attention_mask, cache)

        h = self.embed_tokens(input_ids)
        for s, stage in enumerate(self.stages):
            if len(stage) == 1:
                h = self.layers[stage[0]](h, ctx, cache.layer(s, 0) if cache else None)
            else:
                h = self._group_forward(h, stage, s, ctx, cache)
        if cache is not None:
            cache.length += input_ids.shape[1]
            cache.position += input_ids.shape[1]
        return self.lm_head(self.norm(h))

    def _group_forward(self, h: torch.Tensor, stage: tuple[int, ...], s: int, ctx: StepContext,
                       cache: KVCache | None) -> torch.Tensor:
        """One CQIL group: every layer reads h; returns h' (see the module docstring)."""
        layers = [self.layers[i] for i in stage]
        attn = [layer.attend(h, ctx, cache.layer(s, j) if cache else None) for j, layer in enumerate(layers)]
        d, residual = self.cqil.bypass, self.cqil.bypass_mode == "residual"
        deltas = []
        for j, layer in enumerate(layers):
            a = attn[j] + sum(attn[max(0, j - d):j])  # a_j + b_j (sum of nothing is 0)
            m = layer.feed_forward(h + a)
            deltas.append((a if residual else attn[j]) + m)
        return h + sum(deltas)

    def _step_context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      cache: KVCache | None) -> StepContext:
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
            cache.n_tokens += valid.long().sum(1)
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

    def decoder(self, cache: KVCache):
        """A function next_tokens [B] -> logits [B, vocab] that appends one token per row to `cache`.

        With the Triton backend on CUDA (and `cuda_graphs` on) the step is a captured CUDA graph
        (fused.GraphDecoder); its logits are overwritten by the next call.
        """
        if self.cuda_graphs and self.device.type == "cuda" and self.uses_triton():
            from .fused import GraphDecoder

            return GraphDecoder(self, cache)
        return lambda next_tokens: self(next_tokens[:, None], cache=cache)[:, -1]

    # ----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | list[int] | None = None,
                 attention_mask: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, seed: int | None = None) -> torch.Tensor:
        """Continue each prompt by up to `max_new_tokens` tokens with a KV cache.

        input_ids: [B, T] (left-padded when B > 1, with `attention_mask` [B, T] marking real tokens).
        Greedy unless do_sample; sampling uses temperature, then top_k, then top_p (nucleus), drawing
        from `generator` (or a new one seeded with `seed`). Rows that produced an eos token are filled
        with that eos token afterwards; generation stops early when every row has finished.
        Returns [B, T + n] token ids with n <= max_new_tokens.
        """
        return generate(self, input_ids, max_new_tokens, do_sample=do_sample, temperature=temperature,
                        top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                        attention_mask=attention_mask, generator=generator, seed=seed)

    @classmethod
    def from_pretrained(cls, src: Any, cqil: CQILConfig | dict | str | os.PathLike | None = None,
                        device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, progress: bool = False,
                        lora: str | os.PathLike | None = None, devices=None,
                        held_layers=None, **parallel):
        """Load a LLaMA checkpoint.

        src: a local Hugging Face directory (config.json + *.safetensors or pytorch_model*.bin, sharded
            or not), a transformers LlamaForCausalLM, or a .gguf file (dequantized to `dtype`).
        cqil: a CQILConfig, a dict or JSON file with the authors' keys (`cqil_layers`, `d`), or None:
            then a directory whose config.json carries `cqil_layers` uses it, else no groups. Pass
            CQILConfig() to force the original model.
        device: default "cuda" when available, else "cpu" (a transformers model: its own device).
        dtype: default bfloat16 on CUDA and float32 on CPU (a transformers model: its own dtype).
        Weights stream tensor by tensor into the model; no second full copy is held. A transformers
        model whose device and dtype already match shares its weight storage with the result.
        lora: a PEFT LoRA adapter directory (e.g. the CQIL authors' released adapters for their
            `cqil_layers`) merged into the weights at load time (lora.py); then nothing is shared.
        devices: several devices, e.g. [0, 1] or ["cpu", "cpu"]: the layers of every group are spread
            over one process per device (rank r runs layer r of each group) and the result is a
            parallel.ParallelCQILLlama that starts and drives them (close() it, or use `with`); `src`
            must then be a path. Extra keyword arguments (backend, one_shot, output_device, timeout_s,
            bypass_exchange, microbatch_rows) go to it.
        held_layers: read only these layers (or a function (LlamaArgs, CQILConfig) -> layers); the
            others stay on "meta". How a rank loads its part (parallel/rank.py).
        """
        from .checkpoint import load_pretrained

        if devices is not None:
            if device is not None:
                raise ValueError("pass device (one process) or devices (one process per device), not both")
            from .parallel import ParallelCQILLlama

            return ParallelCQILLlama(src, cqil, devices=devices, dtype=dtype, lora=lora, **parallel)
        if parallel:
            raise TypeError(f"from_pretrained got unexpected arguments {sorted(parallel)} (they need devices=)")
        return load_pretrained(cls, src, cqil=cqil, device=device, dtype=dtype, progress=progress, lora=lora,
                               held_layers=held_layers)
