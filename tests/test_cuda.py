"""CUDA: the model in fp32 / bf16 / fp16 on the GPU (skipped on machines without one)."""

import pytest
import torch

from cqil_kernels import CQILConfig, CQILLlama

from conftest import left_padding_mask, random_hf_model

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_groups_error_no_worse_than_transformers_in_same_dtype(dtype):
    """Against an fp64 CPU run of transformers, our error in `dtype` is at most ~2x transformers' own."""
    hf = random_hf_model(seed=30, scale=0.05)
    ids = torch.randint(0, hf.config.vocab_size, (2, 41))
    with torch.no_grad():
        exact = hf.double()(ids).logits
        hf_gpu = hf.to("cuda", dtype)
        theirs = hf_gpu(ids.cuda()).logits.cpu()
        ours = CQILLlama.from_pretrained(hf_gpu)(ids.cuda()).cpu()
    assert ours.dtype == dtype
    err_ours, err_theirs = _rel(ours, exact), _rel(theirs, exact)
    assert err_ours <= 2 * err_theirs + 1e-6, (err_ours, err_theirs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cached_decode_matches_full_forward(dtype):
    hf = random_hf_model(seed=31, scale=0.05)
    model = CQILLlama.from_pretrained(hf, cqil=CQILConfig([[1, 2], [3, 4, 5]], bypass=1),
                                      device="cuda", dtype=dtype)
    ids = torch.randint(0, 97, (3, 20), device="cuda")
    mask = left_padding_mask(ids, [0, 6, 0])
    with torch.no_grad():
        full = model(ids, mask)
        cache = model.new_cache(3, 20)
        prefill = model(ids[:, :12], mask[:, :12], cache=cache)
        steps = [model(ids[:, t:t + 1], cache=cache) for t in range(12, 20)]
    cached = torch.cat([prefill] + steps, dim=1)
    real = mask.bool()
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    assert _rel(cached[real], full[real]) < tol


def test_greedy_generate_fp32_equals_full_forwards_and_defaults_to_bf16(tmp_path):
    hf = random_hf_model(seed=32)
    model = CQILLlama.from_pretrained(hf, cqil=CQILConfig([[2, 3, 4]], bypass=2), device="cuda")
    assert model.device.type == "cuda" and model.dtype == torch.float32  # a model object keeps its dtype
    ids = torch.randint(0, 97, (2, 7), device="cuda")
    out = model.generate(ids, 12)
    expected = ids
    with torch.no_grad():
        for _ in range(12):
            expected = torch.cat([expected, model(expected)[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, expected)

    hf.save_pretrained(tmp_path)
    loaded = CQILLlama.from_pretrained(tmp_path)
    assert loaded.device.type == "cuda" and loaded.dtype == torch.bfloat16
    sampled = loaded.generate(ids, 8, do_sample=True, top_p=0.9, seed=5)
    assert torch.equal(sampled, loaded.generate(ids, 8, do_sample=True, top_p=0.9, seed=5))
