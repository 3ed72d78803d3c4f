"""Fused Triton kernels for a CQIL group of P layers (P = 1 for an ungrouped layer).

One kernel family per file; each has a pure-PyTorch twin under `cqil_kernels.reference`, a test under
tests/ops/ and a benchmark under benchmarks/:
    group_gemm.py       QKV (+ input RMSNorm), o_proj, gate/up (+ SwiGLU), down (sum over the group)
    rope_kv.py          RoPE on q and k of all P layers + the KV-cache write
    attention.py        causal flash attention (prefill) and split-KV flash decoding over P layers' caches
    group_residual.py   bypass prefix sums + residual + post-attention RMSNorm
    rms_norm.py         RMSNorm of the rows for each layer of a group (the cuBLAS prefill form's input norm)
    cache_advance.py    the KV cache's bookkeeping for a step's new tokens (positions, validity, slots)
    argmax.py           greedy decoding's argmax over the vocabulary
Importing this package needs Triton; `triton_unavailable_reason()` in `_common` says why it is missing.
"""
