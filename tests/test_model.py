"""CQILLlama against transformers (no groups) and against a float64 transcription of docs/design.md (groups)."""

import math

import pytest
import torch

from cqil_kernels import CQILConfig, CQILLlama
from cqil_kernels.model import KVCache

from conftest import left_padding_mask, random_hf_model

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

HF_CONFIGS = {
    "mha-untied": dict(num_key_value_heads=6, tie_word_embeddings=False),
    "gqa3-tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "odd-sizes": dict(hidden_size=59, intermediate_size=97, num_attention_heads=1,
                      num_key_value_heads=1, head_dim=26, vocab_size=61),
    "llama3-rope": dict(rope_scaling=LLAMA3_ROPE, max_position_embeddings=128),
    "linear-rope": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "head-dim-bias": dict(head_dim=12, attention_bias=True, mlp_bias=True),
}


@pytest.mark.parametrize("name", HF_CONFIGS)
def test_no_groups_matches_transformers(name):
    hf = random_hf_model(seed=1, **HF_CONFIGS[name])
    model = CQILLlama.from_pretrained(hf)
    ids = torch.randint(0, hf.config.vocab_size, (2, 37))
    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_no_groups_matches_transformers_with_left_padding():
    hf = random_hf_model(seed=2)
    model = CQILLlama.from_pretrained(hf)
    ids = torch.randint(0, hf.config.vocab_size, (3, 19))
    mask = left_padding_mask(ids, [0, 5, 18])
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
        got = model(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# A float64 implementation that follows docs/design.md's equations literally, from the raw weights.


def _ref_forward(hf, ids, groups, d, mode):
    w = {k: v.double() for k, v in hf.state_dict().items()}
    c = hf.config
    H, Hkv, Dh = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    theta = c.rope_parameters["rope_theta"]
    T = ids.shape[1]
    inv_freq = 1.0 / theta ** (torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rms(x, weight):
        return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.rms_norm_eps)

    def rope(x):
        half = Dh // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    def attn(l, x):
        p = f"model.layers.{l}.self_attn."
        B = x.shape[0]
        q = (x @ w[p + "q_proj.weight"].T).view(B, T, H, Dh).transpose(1, 2)
        k = (x @ w[p + "k_proj.weight"].T).view(B, T, Hkv, Dh).transpose(1, 2)
        v = (x @ w[p + "v_proj.weight"].T).view(B, T, Hkv, Dh).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(Dh)
        scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * Dh)
        return o @ w[p + "o_proj.weight"].T

    def mlp(l, x):
        p = f"model.layers.{l}.mlp."
        g, u = x @ w[p + "gate_proj.weight"].T, x @ w[p + "up_proj.weight"].T
        return (g * torch.sigmoid(g) * u) @ w[p + "down_proj.weight"].T

    def norm(l, which, x):
        return rms(x, w[f"model.layers.{l}.{which}.weight"])

    h = w["model.embed_tokens.weight"][ids]
    group_of = {g[0]: g for g in groups}
    l = 0
    while l < c.num_hidden_layers:
        G = group_of.get(l, [l])
        a = [attn(lj, norm(lj, "input_layernorm", h)) for lj in G]
        outs = []
        for j, lj in enumerate(G):
            b = sum((a[j - i] for i in range(1, min(d, j) + 1)), torch.zeros_like(h))
            if mode == "residual":
                r = h + a[j] + b
                outs.append(r + mlp(lj, norm(lj, "post_attention_layernorm", r)))
            else:
                m = mlp(lj, norm(lj, "post_attention_layernorm", h + a[j] + b))
                outs.append(h + a[j] + m)
        h = h + sum(o - h for o in outs)
        l += len(G)
    head = w["lm_head.weight"] if "lm_head.weight" in w else w["model.embed_tokens.weight"]
    return rms(h, w["model.norm.weight"]) @ head.T


GROUPINGS = [
    ([[1, 2]], 0),
    ([[1, 2]], 1),
    ([[0, 1, 2], [3, 4]], 1),          # a group at the first layer
    ([[2, 3, 4, 5]], 2),               # a group at the last layer, P = 4
    ([[0, 1], [2, 3], [4, 5]], 2),     # every layer grouped; d larger than needed for P = 2
    ([[1, 2, 3, 4]], 3),
]


@pytest.mark.parametrize("mode", ["residual", "mlp_input"])
@pytest.mark.parametrize("groups, d", GROUPINGS)
def test_groups_match_float64_design_equations(groups, d, mode):
    hf = random_hf_model(seed=3)
    model = CQILLlama.from_pretrained(hf, cqil=CQILConfig(groups, bypass=d, bypass_mode=mode))
    ids = torch.randint(0, hf.config.vocab_size, (2, 23))
    expected = _ref_forward(hf, ids, groups, d, mode)
    with torch.no_grad():
        got = model(ids).double()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # The grouping must change the function, or this test would not see a wrong grouping.
    baseline = _ref_forward(hf, ids, [], 0, mode)
    assert (expected - baseline).abs().max() > 1e-2


def test_reference_without_groups_is_transformers():
    hf = random_hf_model(seed=4)
    ids = torch.randint(0, hf.config.vocab_size, (1, 11))
    with torch.no_grad():
        torch.testing.assert_close(_ref_forward(hf, ids, [], 0, "residual").float(), hf(ids).logits,
                                   atol=1e-4, rtol=1e-4)


def test_bypass_modes_agree_without_bypass():
    hf = random_hf_model(seed=5)
    ids = torch.randint(0, hf.config.vocab_size, (1, 9))
    model = CQILLlama.from_pretrained(hf, cqil=CQILConfig([[1, 2, 3]], 0, "residual"))
    with torch.no_grad():
        a = model(ids)
        model.cqil = CQILConfig([[1, 2, 3]], 0, "mlp_input")
        b = model(ids)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bf16_cpu_close_to_fp32():
    hf = random_hf_model(seed=6, scale=0.05)
    cqil = CQILConfig([[1, 2], [3, 4]], bypass=1)
    fp32 = CQILLlama.from_pretrained(hf, cqil=cqil)
    bf16 = CQILLlama.from_pretrained(hf, cqil=cqil, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    ids = torch.randint(0, hf.config.vocab_size, (2, 17))
    with torch.no_grad():
        ref, got = fp32(ids), bf16(ids).float()
    rel = (got - ref).norm() / ref.norm()
    assert rel < 3e-2, rel  # bf16 keeps 8 bits of mantissa: ~4e-3 per rounding, 6 layers


def test_changing_cqil_validates_and_needs_a_new_cache():
    model = CQILLlama.from_pretrained(random_hf_model())
    with pytest.raises(ValueError, match=r"group \[5, 6\]: layer index 6 is outside the model"):
        model.cqil = CQILConfig([[5, 6]])
    with pytest.raises(TypeError):
        model.cqil = [[1, 2]]
    cache = model.new_cache(1, 8)
    model.cqil = CQILConfig([[1, 2]])
    with pytest.raises(ValueError, match="another CQIL grouping"):
        model(torch.tensor([[1, 2]]), cache=cache)


def test_kv_cache_groups_are_contiguous():
    model = CQILLlama.from_pretrained(random_hf_model(), cqil=CQILConfig([[1, 2, 3]]))
    cache = model.new_cache(batch=2, max_seq=10)
    assert [tuple(k.shape) for k in cache.k] == [(1, 2, 2, 10, 8), (3, 2, 2, 10, 8), (1, 2, 2, 10, 8),
                                                 (1, 2, 2, 10, 8)]
    assert all(k.is_contiguous() for k in cache.k)
    for kv in (cache.k, cache.v):  # in stage order, back to back (the runs copy_prompt copies span them)
        assert all(b.data_ptr() == a.data_ptr() + a.nbytes for a, b in zip(kv, kv[1:]))
    # one allocation (not filled: model.allocate); the stages' keys and values are disjoint views of it
    views = cache.k + cache.v
    for i, t in enumerate(views):
        t.fill_(i + 1)
    assert all((t == i + 1).all() for i, t in enumerate(views))  # no two views overlap


@pytest.mark.parametrize("made_under_inference_mode", [False, True])
def test_kv_cache_views_are_made_at_first_use_as_the_buffers_are(made_under_inference_mode):
    """A new cache allocates its buffers and makes no view of them (a prompt into a new cache first touches
    them after its replay is queued); the views first asked for under inference_mode (generate's) are what the
    constructor made before: normal tensors of a normal cache, which clear() and copy_prompt update outside it
    (an inference-mode view there raised "Inplace update to inference tensor outside InferenceMode")."""
    model = CQILLlama.from_pretrained(random_hf_model())
    with torch.inference_mode(made_under_inference_mode):
        cache, src = model.new_cache(batch=2, max_seq=12), model.new_cache(batch=2, max_seq=8)
    assert cache._run_views is None and cache._field_views is None and cache._stage_views is None
    with torch.inference_mode():
        views = [cache.key_valid, cache.n_tokens, cache.position, cache.start, *cache.runs[0], *cache.k]
    assert all(t.is_inference() == made_under_inference_mode for t in views)
    with torch.inference_mode(made_under_inference_mode):  # the other mode: the fields (and their zeroing) too
        other = model.new_cache(batch=2, max_seq=12)
    assert int(other.position) == 0 and not other.key_valid.any()
    assert other.position.is_inference() == made_under_inference_mode
    assert cache.key_valid is views[0] and cache.runs[0][0] is views[4]  # made once
    with torch.inference_mode(made_under_inference_mode):
        src.key_valid[:, :5] = True
        src.n_tokens.fill_(5)
        cache.copy_prompt(src, 5)
        assert int(cache.position) == 5 and cache.key_valid[:, :5].all() and not cache.key_valid[:, 5:].any()
        cache.clear()
        assert not cache.key_valid.any() and int(cache.position) == 0


@pytest.mark.parametrize("batch, max_seq, bad", [(0, 8, "batch"), (-1, 8, "batch"), (1.5, 8, "batch"),
                                                 (True, 8, "batch"), ("2", 8, "batch"), (1, 0, "max_seq"),
                                                 (1, -3, "max_seq"), (1, 8.0, "max_seq"), (1, None, "max_seq"),
                                                 (1, "8", "max_seq")])
def test_a_kv_cache_of_a_size_that_is_not_a_positive_int_is_refused_by_name(batch, max_seq, bad):
    """new_cache (and KVCache, which a rank makes itself) refuse a batch or max_seq that is not an int >= 1 with
    an error naming it, not torch's message about a negative dimension or a float accepted to fail later."""
    model = CQILLlama.from_pretrained(random_hf_model())
    for make in (lambda: model.new_cache(batch, max_seq),
                 lambda: KVCache(model.args, model.stages, batch, max_seq, model.device, model.dtype)):
        with pytest.raises(ValueError, match=f"KV cache's {bad} must be an int >= 1"):
            make()
    limit = model.args.max_position_embeddings
    for make in (model.new_cache, lambda b, s: KVCache(model.args, model.stages, b, s, model.device, model.dtype)):
        assert make(1, limit).max_seq == limit
        with pytest.raises(ValueError, match=f"{limit + 1} positions exceeds max_position_embeddings"):
            make(1, limit + 1)


@pytest.mark.parametrize("cache", ["cache", 3, {"k": []}])
def test_a_cache_that_is_not_a_kv_cache_is_refused_by_type(cache):
    """forward and decoder take a KVCache (or, forward, None): anything else is a TypeError naming its type, not an
    AttributeError from inside the step or, for the decoder, steps that never append to a cache."""
    model = CQILLlama.from_pretrained(random_hf_model())
    with pytest.raises(TypeError, match=f"cache must be a KVCache .*got {type(cache).__name__}"):
        model(torch.tensor([[1, 2]]), cache=cache)
    for bad in (cache, None):
        with pytest.raises(TypeError, match=f"cache must be a KVCache .*got {type(bad).__name__}"):
            model.decoder(bad)


def test_device_dtype_and_graph_signature_follow_the_weights_however_they_are_held():
    """The model's device, dtype and graph signature read the embedding, lm_head and norm weights from the
    modules' own parameter tables (cheap): a weight replaced by hand, moved or cast shows in them, and a
    module replaced by one whose weight is not a parameter of its own is still read (through attributes)."""
    model = CQILLlama.from_pretrained(random_hf_model())
    before = model.graph_signature(scan=False)
    assert (model.device, model.dtype) == (model.embed_tokens.weight.device, model.embed_tokens.weight.dtype)
    model.norm.weight = torch.nn.Parameter(model.norm.weight.detach().clone())
    assert model.graph_signature(scan=False) != before
    model.to(torch.float64)
    assert model.dtype == torch.float64 and model.graph_signature(scan=False)[3] == torch.float64

    class Wrapped(torch.nn.Module):  # e.g. an adapter around the embedding: no weight of its own
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        @property
        def weight(self):
            return self.inner.weight

    model.embed_tokens = Wrapped(model.embed_tokens)
    assert model.dtype == torch.float64 and model.device == model.embed_tokens.inner.weight.device
    assert model.graph_signature(scan=False)[5] == model.embed_tokens.inner.weight.data_ptr()


def test_a_new_caches_bookkeeping_is_never_first_zeroed_inside_a_graph_capture(monkeypatch):
    """The bookkeeping's zeroing waits for its first use, a kernel: inside a CUDA graph's capture it would be
    recorded and empty the cache at every replay, so a first use there is refused (a capture of a cache's
    step always follows an eager one: graphs._CapturedLazily). A cache cleared first needs no zeroing and
    may be; so may the capture of an already used one. (The capture is simulated: this runs on any device.)"""
    model = CQILLlama.from_pretrained(random_hf_model())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    fresh, cleared, used = (model.new_cache(batch=1, max_seq=8) for _ in range(3))
    cleared.clear()
    used.position.zero_()
    for cache in (fresh, cleared, used):
        cache.device = torch.device("cuda")  # as a CUDA cache reports itself; its buffers stay where they are
    with pytest.raises(RuntimeError, match="first used inside a CUDA graph capture"):
        fresh.position
    assert fresh._field_views is None
    for cache in (cleared, used):
        assert int(cache.position) == 0 and not cache.key_valid.any()


@pytest.mark.parametrize("batch, max_seq", [(1, 1), (3, 17), (2, 128)])
def test_kv_cache_bookkeeping_is_one_buffer_of_separate_fields(batch, max_seq):
    """key_valid, n_tokens, position and start are views of one buffer (one allocation, and one fill in
    clear()), each contiguous at a 16-byte boundary, zeroed as they are first used (whatever the allocator
    left there); writing one leaves the others alone; clear() zeroes them all and leaves the keys and values
    in place."""
    model = CQILLlama.from_pretrained(random_hf_model())
    cache = model.new_cache(batch=batch, max_seq=max_seq)
    assert cache._field_views is None
    cache._bookkeeping.fill_(0xA5)  # what a reused block may hold
    fields = {"key_valid": (torch.bool, (batch, max_seq)), "n_tokens": (torch.int64, (batch,)),
              "position": (torch.int32, (1,)), "start": (torch.int32, (1,))}
    for name, (dtype, shape) in fields.items():
        t = getattr(cache, name)
        assert t.dtype == dtype and tuple(t.shape) == shape and t.is_contiguous() and not t.any()
        assert t.data_ptr() % 16 == 0
    cache.key_valid.fill_(True)
    cache.n_tokens.fill_(-1)  # every byte set
    cache.position.fill_(7)
    cache.start.fill_(5)
    assert cache.key_valid.all() and (cache.n_tokens == -1).all()
    assert int(cache.position) == 7 and int(cache.start) == 5
    cache.k[0].fill_(2.0)
    cache.length = 3
    cache.clear()
    assert all(not getattr(cache, name).any() for name in fields) and cache.length == 0
    assert (cache.k[0] == 2.0).all()
