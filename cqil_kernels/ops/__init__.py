"""Fused Triton kernels for a CQIL group of P layers (P = 1 for an ungrouped layer).

One kernel family per file; each has a pure-PyTorch twin under `cqil_kernels.reference`:
    group_gemm.py       QKV (+ input RMSNorm), o_proj, gate/up (+ SwiGLU), down (sum over the group)
    rope_kv.py          RoPE on q and k of all P layers + the KV-cache write
    attention.py        causal flash attention (prefill) and split-KV flash decoding over P layers' caches
    group_residual.py   bypass prefix sums + residual + post-attention RMSNorm
    rms_norm.py         RMSNorm of the rows for each layer of a group (the cuBLAS prefill form's input norm)
Importing this package needs Triton; `triton_unavailable_reason()` in `_common` says why it is missing.
"""
