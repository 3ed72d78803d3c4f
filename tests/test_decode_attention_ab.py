"""The one-launch decode of benchmarks/decode_attention_ab.py (issue 26's prototype: fused.stage_attention with
ops.attention.decode_attention for T = 1) gives the two-launch step's decode logits and KV cache, for
groupings with bypass in both modes, biases, GQA and left padding (CPU: the interpreter)."""

import pytest
import torch

from cqil_kernels import CQILConfig, CQILLlama, fused

from conftest import assert_kernel_close, import_benchmark, left_padding_mask, random_hf_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GROUPINGS = {
    "none": CQILConfig(),
    "P3-d1-residual": CQILConfig(groups=((1, 2, 3),), bypass=1),
    "P4-d2-mlp_input": CQILConfig(groups=((2, 3, 4, 5),), bypass=2, bypass_mode="mlp_input"),
}


@pytest.fixture(scope="module")
def ab():
    return import_benchmark("decode_attention_ab")


@pytest.mark.parametrize("name", GROUPINGS)
def test_one_launch_decode_equals_the_two_launch_step(ab, name):
    hf = random_hf_model(seed=5, head_dim=16, attention_bias=True, mlp_bias=True)
    model = CQILLlama.from_pretrained(hf, cqil=GROUPINGS[name], device=DEVICE, dtype=torch.float32)
    exact = CQILLlama.from_pretrained(hf, cqil=GROUPINGS[name], device=DEVICE, dtype=torch.float64)
    model.backend, exact.backend = "triton", "torch"
    ids = torch.randint(0, model.args.vocab_size, (2, 9), device=DEVICE)
    mask = left_padding_mask(ids, [3, 0])
    runs = {}
    with torch.no_grad():
        for variant, net in (("two launches", model), ("one launch", model), ("exact", exact)):
            with ab.variant(variant if variant != "exact" else "two launches"):
                cache = net.new_cache(2, 16)
                steps = [net(ids, mask, cache=cache)[:, -1]]
                for t in range(4):
                    steps.append(net(ids[:, t:t + 1], cache=cache)[:, -1])
                runs[variant] = (torch.stack(steps), torch.stack([torch.stack(kv) for kv in cache.runs]))
    assert fused.stage_attention.__module__ == fused.__name__  # the script's variant is undone after it
    logits, kv = runs["one launch"]
    assert_kernel_close(logits, runs["two launches"][0], runs["exact"][0], terms=model.args.hidden_size)
    assert_kernel_close(kv[..., :13, :], runs["two launches"][1][..., :13, :], runs["exact"][1][..., :13, :],
                        terms=model.args.hidden_size)
