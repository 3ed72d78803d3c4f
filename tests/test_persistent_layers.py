"""The persistent decode-layers prototype of benchmarks/persistent_layers.py (issue 26): one launch for
every layer of a sequential decode step gives the fused step's logits and KV cache entries, within the
kernels' tolerance against a float64 model (CPU: the interpreter, one program taking every task in
order, and every GEMV task forced through its chunk-by-chunk waits; CUDA: programs running together)."""

import pytest
import torch

from cqil_kernels import CQILConfig, CQILLlama, fused

from conftest import assert_kernel_close, import_benchmark, interpreter, left_padding_mask, random_hf_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=3, vocab_size=97)


@pytest.fixture(scope="module")
def layers_module():
    return import_benchmark("persistent_layers")


def _check_step(layers_module, dtype, batch, force_chunks, block_n=16, block_k=32, splits=None, qkv_splits=None,
                pads=None):
    hf = random_hf_model(seed=11, **SHAPE)
    model = CQILLlama.from_pretrained(hf, cqil=CQILConfig(), device=DEVICE, dtype=dtype)
    model.backend = "triton"
    exact = CQILLlama.from_pretrained(hf, cqil=CQILConfig(), device=DEVICE, dtype=torch.float64)
    exact.backend = "torch"
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, 97, (batch, 9), generator=g).to(DEVICE)
    nxt = torch.randint(0, 97, (batch,), generator=g).to(DEVICE)
    runner = layers_module.PersistentStep(model, batch, block_n=block_n, block_k=block_k, block_s=4, splits=splits,
                                          qkv_splits=qkv_splits)
    runner.force_chunks = force_chunks
    mask = left_padding_mask(ids, pads) if pads else torch.ones_like(ids)
    with torch.no_grad():
        caches = []
        for _ in range(2):
            cache = model.new_cache(batch, 16)
            model(ids, mask, cache=cache)
            caches.append(cache)
        got = runner.step(nxt, caches[0])
        twin = fused.step(model, nxt[:, None], None, caches[1], 1)[:, -1]
        caches[1].length += 1
        exact_cache = exact.new_cache(batch, 16)
        want = exact(torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1),
                     cache=exact_cache)[:, -1]
    assert caches[0].length == caches[1].length == 10
    assert_kernel_close(got, twin, want, terms=SHAPE["intermediate_size"])
    # the key and value the step wrote at slot 9, every layer, against the fused step's and float64
    for (got_kv, twin_kv, exact_kv) in zip(caches[0].runs[0], caches[1].runs[0], exact_cache.runs[0]):
        assert_kernel_close(got_kv[..., 9, :], twin_kv[..., 9, :], exact_kv[..., 9, :], terms=SHAPE["hidden_size"])
    assert torch.equal(caches[0].key_valid, caches[1].key_valid)
    return runner


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, force, splits, qkv_splits", [(1, True, 4, 2), (3, False, 1, 1), (2, False, 2, 2)])
def test_persistent_layers_match_the_fused_step(layers_module, dtype, batch, force, splits, qkv_splits):
    """10 cached positions in attention blocks of 4: with 4 splits, one split of positions 0-3, one of 4-7,
    one of 8-9 and one empty (its max stays -inf). QKV heads over 1 or 2 parts of the hidden size."""
    runner = _check_step(layers_module, dtype, batch, force, splits=splits, qkv_splits=qkv_splits)
    L, H, Hkv = 3, 4, 2
    span = (runner.state.numel() - 1) // L
    counters = runner.state[1:].view(L, span)
    assert (counters[:, :H + 2 * Hkv] == 1).all()  # every QKV head stored once
    assert (counters[:, H + 2 * Hkv:2 * H + 2 * Hkv] == batch).all()  # each head's attention, per row
    BM = runner.block_m
    arrived = counters[:, -4 - (H + 2 * Hkv) - H * BM:-4 - (H + 2 * Hkv)].view(L, H, BM)
    assert (arrived[..., :batch] == splits).all() and not arrived[..., batch:].any()
    assert (counters[:, -4 - (H + 2 * Hkv):-4] == (qkv_splits if qkv_splits > 1 else 0)).all()
    done = counters[:, -4:]  # B (combined head rows), C, D, E tasks done
    assert done.tolist() == [[H * batch, 64 // 16, 96 // 16, 64 // 16]] * L


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("force", [False, True])
def test_persistent_layers_cuda(layers_module, force):
    runner = _check_step(layers_module, torch.bfloat16, 5, force, block_n=32, block_k=32)
    cache = runner.model.new_cache(5, 16)
    runner.model(torch.zeros(5, 4, dtype=torch.long, device="cuda"), cache=cache)
    summary = runner.profile(torch.zeros(5, dtype=torch.long, device="cuda"), cache)
    counts = runner.task_counts()
    assert {k: v["tasks"] for k, v in summary["kinds"].items()} == {k: 3 * n for k, n in counts.items()}
    assert 0 < summary["busy_pct"] <= 100 and summary["span_us"] > 0


@interpreter
def test_persistent_layers_more_than_16_rows(layers_module):
    """19 rows: tiles of 32 rows."""
    assert _check_step(layers_module, torch.bfloat16, 19, False, splits=1, qkv_splits=2).block_m == 32


@interpreter
def test_persistent_layers_left_padded_rows(layers_module):
    """Rows whose prompts were left-padded: RoPE at each row's own position, padded keys masked."""
    _check_step(layers_module, torch.float32, 3, True, splits=2, qkv_splits=2, pads=[0, 3, 6])


def test_task_profile_summary(layers_module):
    """Two layers of tasks A, B (2 each), the second layer starting when the first ends, on 2 programs."""
    counts = {"A": 2, "B": 2}
    rows = [[0, 1000, 0], [0, 1000, 1], [1000, 3000, 0], [1000, 2000, 1],
            [3000, 4000, 0], [3000, 4000, 1], [4000, 5000, 0], [4000, 6000, 1]]
    summary = layers_module.summarize_profile(torch.tensor(rows), counts, 2, 2)
    assert summary["span_us"] == 6.0 and summary["sms_used"] == 2
    assert summary["busy_pct"] == round(100 * 10 / 12, 1)  # 10 us of tasks in 2 programs x 6 us
    assert summary["kinds"]["A"] == dict(tasks=4, median_us=1.0, total_us=4.0, first_start_us=0.0,
                                         last_end_us=4.0)
    assert summary["kinds"]["B"]["tasks"] == 4 and summary["kinds"]["B"]["total_us"] == 6.0
    assert summary["layer_span_median_us"] == 3.0
    with pytest.raises(ValueError, match="expected 2 x 4"):
        layers_module.summarize_profile(torch.tensor(rows[:7]), counts, 2, 2)


def test_persistent_layers_refuse_what_they_do_not_run(layers_module):
    model = CQILLlama.from_pretrained(random_hf_model(seed=1, **SHAPE), cqil=CQILConfig(groups=((0, 1),)),
                                      device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="sequential models only"):
        layers_module.PersistentStep(model, 1)
    model.cqil = CQILConfig()
    with pytest.raises(ValueError, match="multiples of block_k"):
        layers_module.PersistentStep(model, 1, block_k=48)
    with pytest.raises(ValueError, match="batch must be 1..32"):
        layers_module.PersistentStep(model, 33)
    with pytest.raises(ValueError, match="power of two"):
        layers_module.PersistentStep(model, 1, block_n=16, block_k=32, splits=3)
    with pytest.raises(ValueError, match="qkv_splits must divide hidden / block_k = 2"):
        layers_module.PersistentStep(model, 1, block_n=16, block_k=32, qkv_splits=3)
