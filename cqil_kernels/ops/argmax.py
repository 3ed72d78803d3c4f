"""Greedy decoding's argmax over the vocabulary, one row of logits per sequence, in one launch.

    row_argmax(logits [B, V]) -> [B] int64: the index of each row's largest value; among equal values
    the lowest index, and a NaN counts as larger than everything (torch.argmax's rules)

torch's argmax of one 49 k-entry bf16 row took 11-14 us on the H100, a launch of a few blocks walking
the row. Here the row is cut into chunks of BLOCK entries, one program each (B * V / BLOCK programs, so
the whole row is read at once); each program stores its chunk's best (value key, index), takes a ticket
from the row's counter (a CTA barrier, then an acq_rel atomic) and the program that draws the last
ticket reduces the chunks in order and resets the counter (`_common.ticket_counters`, as attention's
split merge does). Values are compared as integers: the fp32 bit pattern mapped to an order-preserving
int32 (negative values have their magnitude bits flipped), with every NaN made the positive quiet NaN,
which then sorts above +inf, and -0.0 made 0.0 (they compare equal).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, check_runnable, check_tensor, interpreting, next_pow2, ticket_counters
from ._pdl import pdl_options, release_consumer, wait_for_producer

BLOCK = 4096  # entries per program: a 49152-entry row is 12 programs


@triton.jit
def _argmax_kernel(x_ptr, key_ptr, idx_ptr, ticket_ptr, out_ptr, V, stride_xb,
                   BLOCK: tl.constexpr, CHUNKS_BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
    wait_for_producer(USE_GDC)  # _pdl.py: before any memory access
    row, chunk = tl.program_id(0), tl.program_id(1)
    chunks = tl.num_programs(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    ok = offs < V
    x = tl.load(x_ptr + row * stride_xb + offs, mask=ok, other=float("-inf")).to(tl.float32)
    release_consumer(USE_GDC)
    x = tl.where(x != x, float("nan"), x)  # one NaN bit pattern, the positive one
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 == 0.0: the first of them wins, as in torch
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # int order = float order
    key = tl.where(ok, key, -2147483647 - 1)
    best = tl.max(key, axis=0)
    first = tl.min(tl.where(key == best, offs, V), axis=0)
    slot = row * chunks + chunk
    tl.store(key_ptr + slot, best)
    tl.store(idx_ptr + slot, first)
    tl.debug_barrier()  # the stores above precede the ticket (acq_rel, GPU scope)
    ticket = tl.atomic_add(ticket_ptr + row, 1, sem="acq_rel")
    if ticket == chunks - 1:  # last to arrive: every chunk's result is visible
        c = tl.arange(0, CHUNKS_BLOCK)
        c_ok = c < chunks
        keys = tl.load(key_ptr + row * chunks + c, mask=c_ok, other=-2147483647 - 1, cache_modifier=".cg")
        idxs = tl.load(idx_ptr + row * chunks + c, mask=c_ok, other=V, cache_modifier=".cg")
        top = tl.max(keys, axis=0)
        tl.store(out_ptr + row, tl.min(tl.where(keys == top, idxs, V), axis=0).to(tl.int64))
        tl.atomic_xchg(ticket_ptr + row, 0)  # ready for the next launch


def row_argmax(logits: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """logits: [B, V] (fp32/fp16/bf16, rows contiguous) -> [B] int64, as logits.argmax(-1).

    out: an optional preallocated int64 [B] to write into.
    """
    check_tensor("logits", logits, ndim=2)
    check_runnable(logits)
    B, V = logits.shape
    if V == 0:
        raise ValueError("logits has an empty vocabulary dimension (V = 0): no argmax")
    if V >= 2**31:
        raise ValueError(f"a vocabulary of {V} entries does not fit int32 indices")
    if out is None:
        out = torch.empty(B, dtype=torch.int64, device=logits.device)
    elif out.dtype != torch.int64 or out.shape != (B,) or out.device != logits.device:
        raise ValueError(f"out must be int64 [B={B}] on {logits.device}")
    if B == 0:
        return out
    block = 256 if interpreting() else BLOCK  # small chunks: the interpreter's tests cross many
    chunks = cdiv(V, block)
    keys = torch.empty(B * chunks, dtype=torch.int32, device=logits.device)
    idxs = torch.empty(B * chunks, dtype=torch.int32, device=logits.device)
    _argmax_kernel[(B, chunks)](
        logits, keys, idxs, ticket_counters(logits.device, B), out, V, logits.stride(0),
        BLOCK=block, CHUNKS_BLOCK=max(16, next_pow2(chunks)), num_warps=8 if block >= 2048 else 4,
        **pdl_options(logits),
    )
    return out
