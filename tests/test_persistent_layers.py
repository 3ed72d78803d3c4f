"""The persistent decode-layers prototype of benchmarks/persistent_layers.py (issue 26): one launch for
every stage of a decode step (layers and CQIL groups, bypass in both modes) gives the fused step's logits
and KV cache entries, within the kernels' tolerance against a float64 model (CPU: the interpreter, one
program taking every task in order, and every GEMV task forced through its chunk-by-chunk waits; CUDA:
programs running together)."""

import pytest
import torch

from cqil_kernels import CQILConfig, CQILLlama, fused

from conftest import assert_kernel_close, import_benchmark, interpreter, left_padding_mask, prototype, random_hf_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=3, vocab_size=97)


@pytest.fixture(scope="module")
def layers_module():
    return import_benchmark("persistent_layers")


def _check_step(layers_module, dtype, batch, force_chunks, block_n=16, block_k=32, splits=None, qkv_splits=None,
                pads=None, cqil=None, layers=3, bias=False):
    cqil = cqil or CQILConfig()
    hf = random_hf_model(seed=11, **{**SHAPE, "num_hidden_layers": layers}, attention_bias=bias, mlp_bias=bias)
    model = CQILLlama.from_pretrained(hf, cqil=cqil, device=DEVICE, dtype=dtype)
    model.backend = "triton"
    exact = CQILLlama.from_pretrained(hf, cqil=cqil, device=DEVICE, dtype=torch.float64)
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
@pytest.mark.parametrize("batch, force, splits, qkv_splits, dtype", [(1, True, 4, 2, torch.float32),
                                                                    (3, False, 1, 1, torch.bfloat16),
                                                                    (2, False, 2, 2, torch.float32)])
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


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("force", [False, True])
def test_persistent_groups_cuda(layers_module, force):
    """Stages of 1, 3 and 2 layers, bypass 1, programs running together."""
    cqil = CQILConfig(groups=((1, 2, 3), (4, 5)), bypass=1)
    runner = _check_step(layers_module, torch.bfloat16, 5, force, block_n=32, block_k=32, cqil=cqil, layers=6)
    cache = runner.model.new_cache(5, 16)
    runner.model(torch.zeros(5, 4, dtype=torch.long, device="cuda"), cache=cache)
    summary = runner.profile(torch.zeros(5, dtype=torch.long, device="cuda"), cache)
    assert {k: v["tasks"] for k, v in summary["kinds"].items()} == {
        k: 6 * n if k[0] in "ABD" else 3 * n for k, n in runner.task_counts().items()}
    assert 0 < summary["busy_pct"] <= 100 and summary["span_us"] > 0


def _clone_cache(model, cache):
    twin = model.new_cache(cache.batch, cache.max_seq)
    for (k, v), (k_src, v_src) in zip(twin.runs, cache.runs):
        k.copy_(k_src)
        v.copy_(v_src)
    for name in ("key_valid", "n_tokens", "position", "start"):
        getattr(twin, name).copy_(getattr(cache, name))
    twin.length = cache.length
    return twin


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch, mode", [(19, "residual"), (1, "mlp_input")])
def test_persistent_steps_are_deterministic_and_follow_the_fused_decode_cuda(layers_module, batch, mode):
    """A race between programs (a task reading what another has not finished) shows as steps that differ
    from run to run: every order of scheduling must give the same bits (the parts of a split are summed in
    part order by whichever arrives last). 24 decode steps, each run twice from the same state; greedy
    tokens and logits follow the fused decode (biases, groups with bypass, left padding)."""
    cqil = CQILConfig(groups=((1, 2, 3), (4, 5)), bypass=1, bypass_mode=mode)
    hf = random_hf_model(seed=4, **{**SHAPE, "num_hidden_layers": 7}, attention_bias=True, mlp_bias=True)
    model = CQILLlama.from_pretrained(hf, cqil=cqil, device="cuda", dtype=torch.float32)
    model.backend = "triton"
    runner = layers_module.PersistentStep(model, batch, block_n=16, block_k=32)
    ids = torch.randint(0, 97, (batch, 11), device="cuda")
    mask = left_padding_mask(ids, [i % 7 for i in range(batch)])
    with torch.no_grad():
        ours, theirs = model.new_cache(batch, 40), model.new_cache(batch, 40)
        model(ids, mask, cache=ours)
        model(ids, mask, cache=theirs)
        token = torch.randint(0, 97, (batch,), device="cuda")
        for _ in range(24):
            again = _clone_cache(model, ours)
            got = runner.step(token, ours).clone()
            assert torch.equal(runner.step(token, again), got), "a persistent step differs from run to run"
            want = fused.step(model, token[:, None], None, theirs, 1)[:, -1]
            theirs.length += 1
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            token = want.argmax(-1)


@interpreter
@prototype
def test_persistent_layers_more_than_16_rows(layers_module):
    """19 rows: tiles of 32 rows (one layer: the tile is the point, and the interpreter runs it slowly)."""
    assert _check_step(layers_module, torch.bfloat16, 19, False, splits=1, qkv_splits=2, layers=1).block_m == 32


@interpreter
@prototype
def test_persistent_layers_left_padded_rows(layers_module):
    """Rows whose prompts were left-padded: RoPE at each row's own position, padded keys masked."""
    _check_step(layers_module, torch.float32, 3, True, splits=2, qkv_splits=2, pads=[0, 3, 6])


def test_task_profile_summary(layers_module):
    """Two stages of tasks A, B (2 each), the second starting when the first ends, on 2 programs."""
    kinds, stages = torch.tensor([0, 0, 1, 1] * 2), torch.tensor([0] * 4 + [1] * 4)
    rows = [[0, 1000, 0], [0, 1000, 1], [1000, 3000, 0], [1000, 2000, 1],
            [3000, 4000, 0], [3000, 4000, 1], [4000, 5000, 0], [4000, 6000, 1]]
    summary = layers_module.summarize_profile(torch.tensor(rows), kinds, stages, ["A", "B"], 2)
    assert summary["span_us"] == 6.0 and summary["sms_used"] == 2
    assert summary["busy_pct"] == round(100 * 10 / 12, 1)  # 10 us of tasks in 2 programs x 6 us
    assert summary["kinds"]["A"] == dict(tasks=4, median_us=1.0, total_us=4.0, first_start_us=0.0,
                                         last_end_us=4.0)
    assert summary["kinds"]["B"]["tasks"] == 4 and summary["kinds"]["B"]["total_us"] == 6.0
    assert summary["stage_span_median_us"] == 3.0
    with pytest.raises(ValueError, match="for 8 tickets"):
        layers_module.summarize_profile(torch.tensor(rows[:7]), kinds, stages, ["A", "B"], 2)


def test_tickets_of_stages(layers_module):
    """A stage of P layers has P times a layer's A, B and D tasks and one set of C and E tasks; the stage
    table gives each stage's first ticket."""
    cqil = CQILConfig(groups=((1, 2, 3),))
    model = CQILLlama.from_pretrained(random_hf_model(seed=1, **{**SHAPE, "num_hidden_layers": 5}), cqil=cqil,
                                      device="cpu", dtype=torch.float32)
    runner = layers_module.PersistentStep(model, 2, block_n=16, block_k=32, splits=2, qkv_splits=2)
    one = runner.task_counts()
    assert one == {"A qkv": 8 * 2, "B attention": 4 * 2 * 2, "C o_proj": 4, "D gate/up": 6, "E down": 4}
    per = sum(one.values())
    three = per + 2 * (one["A qkv"] + one["B attention"] + one["D gate/up"])
    assert runner.stage_table.tolist() == [[0, 0, 1], [per, 1, 3], [per + three, 4, 1]]
    assert runner.tickets == 2 * per + three
    kinds, stages, names = runner.ticket_kinds()
    assert names == list(one) and kinds.numel() == stages.numel() == runner.tickets
    assert torch.bincount(stages).tolist() == [per, three, per]
    assert torch.bincount(kinds[stages == 1]).tolist() == [3 * 16, 3 * 16, 4, 3 * 6, 4]
    assert (kinds.diff()[stages[1:] == stages[:-1]] >= 0).all()  # a stage's tickets in kind order


def test_persistent_layers_refuse_what_they_do_not_run(layers_module):
    model = CQILLlama.from_pretrained(random_hf_model(seed=1, **SHAPE), cqil=CQILConfig(groups=((0, 1),)),
                                      device="cpu", dtype=torch.float32)
    runner = layers_module.PersistentStep(model, 1, block_n=16, block_k=32)
    model.cqil = CQILConfig()
    with pytest.raises(ValueError, match="regrouped since this step was built"):
        runner.step(torch.zeros(1, dtype=torch.long), model.new_cache(1, 4))
    biased = CQILLlama.from_pretrained(random_hf_model(seed=1, **SHAPE, mlp_bias=True), device="cpu",
                                       dtype=torch.float32)
    biased.packed_weights().up_bias = None
    with pytest.raises(ValueError, match="all of gate/up/down, or none"):
        layers_module.PersistentStep(biased, 1, block_n=16, block_k=32)
    with pytest.raises(ValueError, match="multiples of block_k"):
        layers_module.PersistentStep(model, 1, block_k=48)
    with pytest.raises(ValueError, match="batch must be 1..32"):
        layers_module.PersistentStep(model, 33)
    with pytest.raises(ValueError, match="power of two"):
        layers_module.PersistentStep(model, 1, block_n=16, block_k=32, splits=3)
    with pytest.raises(ValueError, match="qkv_splits must divide hidden / block_k = 2"):
        layers_module.PersistentStep(model, 1, block_n=16, block_k=32, qkv_splits=3)


@interpreter
@prototype
@pytest.mark.parametrize("dtype, batch, force, bypass, mode, pads", [
    (torch.float32, 2, True, 0, "residual", None),
    (torch.bfloat16, 3, False, 1, "residual", None),
    (torch.float32, 3, True, 2, "mlp_input", [0, 2, 5]),
])
def test_persistent_groups_match_the_fused_step(layers_module, dtype, batch, force, bypass, mode, pads):
    """Stages of 1, 3 and 2 layers and one of 1 (layers 0 | 1 2 3 | 4 5 | 6): the C tasks' bypass sums and
    residual, the D tasks' norm of the fp32 r_j, the E tasks' sum over the group's down projections."""
    cqil = CQILConfig(groups=((1, 2, 3), (4, 5)), bypass=bypass, bypass_mode=mode)
    runner = _check_step(layers_module, dtype, batch, force, splits=2, qkv_splits=2, pads=pads, cqil=cqil, layers=7)
    L, H = 7, 4
    counters = runner.state[1:].view(L, -1)
    done = counters[:, -4:]  # B (combined head rows, per layer), then a stage's C, D, E tasks at its first layer
    n_c, n_d = 64 // 16, 96 // 16
    assert done[:, 0].tolist() == [H * batch] * L
    assert done[:, 1:].tolist() == [[n_c, P * n_d, n_c] if P else [0, 0, 0] for P in (1, 3, 0, 0, 2, 0, 1)]
    D_CHUNKS = 96 // 32  # every layer's gate/up chunks, each stored by 2 tiles of 16 columns
    off_d = (H + 2 * 2) + H + 64 // 32
    assert (counters[:, off_d:off_d + D_CHUNKS] == 2).all()


@interpreter
@prototype
@pytest.mark.parametrize("dtype, cqil", [(torch.bfloat16, CQILConfig()),
                                         (torch.float32, CQILConfig(groups=((1, 2, 3),), bypass=1))])
def test_persistent_layers_with_biases(layers_module, dtype, cqil):
    """q/k/v/o and gate/up/down biases, added where the fused kernels' epilogues add them."""
    runner = _check_step(layers_module, dtype, 2, False, splits=2, qkv_splits=2, cqil=cqil, layers=4, bias=True)
    assert runner.packed.qkv_bias is not None and runner.packed.down_bias is not None


def test_layer_slopes(layers_module):
    """The per-layer step of each variant and shard shape from its fewest and most sequential layers; runs
    with groups and a variant measured at one layer count give none."""
    rows = [["fused", 4, "none", 1, 1.0, 50.0, None, None, 4_000_000],
            ["fused", 12, "none", 1, 2.6, 50.0, None, None, 12_000_000],
            ["fused", 8, "none", 1, 9.9, 50.0, None, None, 8_000_000],
            ["fused", 12, "2-10:4", 1, 2.0, 50.0, None, None, 1],
            ["persistent", 4, "none", 2, 0.5, 50.0, 3, 128, 2_000_000]]
    slopes = layers_module.layer_slopes(rows, copy_gbps=4000.0)
    assert list(slopes) == ["fused tp1"]
    # 1.6 ms over 8 layers: 200 us a layer; 1 MB a layer at 4000 GB/s: 0.25 us
    assert slopes["fused tp1"] == dict(layers=[4, 12], us_per_layer=200.0, us_at_copy=0.25, fixed_us=199.75)


def test_block_k_fits_the_shard_shapes(layers_module):
    """7B: 128 divides the full layer and the TP2 shard (F 5504); the TP4 shard's F 2752 takes 64."""
    from cqil_kernels.bench import shape_args

    layer_slope = import_benchmark("layer_slope")
    got = [layers_module.fitting_block_k(shape_args("llama-7b", **layer_slope.shard_overrides("llama-7b", tp, 4)),
                                         128, 32) for tp in (1, 2, 4)]
    assert got == [128, 128, 64]
    assert layers_module.fitting_block_k(shape_args("smollm2-135m"), 128, 32) == 64  # hidden 576 = 9 x 64
    assert layers_module.fitting_block_k(shape_args("smollm2-135m"), 128, 128) == 128  # not below block_n
