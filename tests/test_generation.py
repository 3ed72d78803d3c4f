"""KV-cache generation against repeated full forwards, sampling, and input checks."""

import math

import pytest
import torch

from cqil_kernels import CQILConfig, CQILLlama
from cqil_kernels.generation import prefill

from conftest import assert_kernel_close, import_benchmark, left_padding_mask, random_hf_model

GROUPINGS = [CQILConfig(), CQILConfig([[1, 2], [3, 4, 5]], bypass=1),
             CQILConfig([[0, 1, 2]], bypass=2, bypass_mode="mlp_input")]


def _greedy_by_full_forwards(model, ids, mask, n):
    for _ in range(n):
        with torch.no_grad():
            logits = model(ids, mask)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


@pytest.mark.parametrize("cqil", GROUPINGS, ids=["none", "groups-d1", "first-layer-mlp_input"])
def test_greedy_generate_equals_repeated_full_forwards_bs1(cqil):
    model = CQILLlama.from_pretrained(random_hf_model(seed=7), cqil=cqil)
    ids = torch.randint(0, model.args.vocab_size, (1, 9))
    assert torch.equal(model.generate(ids, 12), _greedy_by_full_forwards(model, ids, None, 12))


@pytest.mark.parametrize("cqil", GROUPINGS, ids=["none", "groups-d1", "first-layer-mlp_input"])
def test_greedy_generate_equals_repeated_full_forwards_bs3_left_padded(cqil):
    model = CQILLlama.from_pretrained(random_hf_model(seed=8), cqil=cqil)
    ids = torch.randint(0, model.args.vocab_size, (3, 11))
    mask = left_padding_mask(ids, [4, 0, 10])
    ids = ids.masked_fill(mask == 0, 0)
    out = model.generate(ids, 10, attention_mask=mask)
    assert torch.equal(out, _greedy_by_full_forwards(model, ids, mask, 10))
    # Each padded row continues exactly as it would alone, unpadded.
    for row in range(3):
        alone = ids[row:row + 1, mask[row].bool()]
        assert torch.equal(model.generate(alone, 10)[0, -10:], out[row, -10:])


def test_greedy_matches_transformers_generate():
    hf = random_hf_model(seed=9)
    model = CQILLlama.from_pretrained(hf)
    ids = torch.randint(0, hf.config.vocab_size, (2, 8))
    mask = left_padding_mask(ids, [0, 3])
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, 16, attention_mask=mask), expected)


def test_sampling_is_reproducible_with_seed_or_generator():
    model = CQILLlama.from_pretrained(random_hf_model(seed=10), cqil=CQILConfig([[2, 3]]))
    ids = torch.randint(0, model.args.vocab_size, (2, 5))
    kw = dict(do_sample=True, temperature=1.3, top_k=40, top_p=0.9)
    a = model.generate(ids, 20, seed=123, **kw)
    b = model.generate(ids, 20, generator=torch.Generator().manual_seed(123), **kw)
    c = model.generate(ids, 20, seed=124, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_k_one_and_tiny_top_p_are_greedy():
    model = CQILLlama.from_pretrained(random_hf_model(seed=11))
    ids = torch.randint(0, model.args.vocab_size, (2, 6))
    greedy = model.generate(ids, 8)
    assert torch.equal(model.generate(ids, 8, do_sample=True, top_k=1, seed=0), greedy)
    assert torch.equal(model.generate(ids, 8, do_sample=True, top_p=1e-6, seed=0), greedy)


def test_top_p_keeps_the_smallest_set_reaching_p():
    from cqil_kernels.generation import sample_next

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = torch.stack([sample_next(logits, True, 1.0, None, 0.75, torch.Generator().manual_seed(s))
                         for s in range(300)])
    assert set(draws.flatten().tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.75; 2 and 3 never drawn


def test_eos_stops_rows_and_pads_with_eos():
    model = CQILLlama.from_pretrained(random_hf_model(seed=12))
    ids = torch.randint(0, model.args.vocab_size, (2, 6))
    free = model.generate(ids, 10)
    eos = int(free[0, 8])  # row 0 emits this token at its 3rd new step
    out = model.generate(ids, 10, eos_token_id=eos)
    assert torch.equal(out[0, :9], free[0, :9])
    assert (out[0, 9:] == eos).all()
    stop_all = model.generate(ids[:1], 10, eos_token_id=eos)
    assert stop_all.shape[1] == 9  # stops as soon as every row has finished


def _streamed(model, ids, new, **kw):
    """model.stream's steps appended to the prompt, as generate returns them; each step checked as a [B]
    int64 CPU tensor."""
    steps = list(model.stream(ids, new, **kw))
    assert all(t.shape == (ids.shape[0],) and t.dtype == torch.int64 and t.device.type == "cpu" for t in steps)
    return torch.cat([ids.cpu(), *(t[:, None] for t in steps)], dim=1)


@pytest.mark.parametrize("cqil", GROUPINGS, ids=["none", "groups-d1", "first-layer-mlp_input"])
def test_stream_gives_generates_tokens_step_by_step(cqil):
    """model.stream yields, one step at a time, the tokens generate returns: greedy over a left-padded batch,
    with an eos that ends one row early and then every row, sampling with a seed, a prompt in parts."""
    model = CQILLlama.from_pretrained(random_hf_model(seed=12), cqil=cqil)
    ids = torch.randint(0, model.args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = left_padding_mask(ids, [0, 4])
    free = model.generate(ids, 12, attention_mask=mask)
    assert torch.equal(_streamed(model, ids, 12, attention_mask=mask), free.cpu())
    eos = int(free[0, 11])  # row 0 ends at its third new token
    for kw in (dict(eos_token_id=eos), dict(eos_token_id=[eos, int(free[1, 12])]),
               dict(do_sample=True, temperature=1.2, top_k=20, top_p=0.95, seed=5), dict(prefill_chunk=4)):
        want = model.generate(ids, 12, attention_mask=mask, **kw)
        assert torch.equal(_streamed(model, ids, 12, attention_mask=mask, **kw), want.cpu()), kw
    one = ids[:1, :5]
    stop = int(model.generate(one, 6)[0, 7])
    assert _streamed(model, one, 6, eos_token_id=stop).shape[1] == model.generate(one, 6, eos_token_id=stop).shape[1]


def test_a_stream_checks_its_arguments_when_called():
    """Bad arguments raise at model.stream(...), before the first step is asked for, as generate's do."""
    model = CQILLlama.from_pretrained(random_hf_model(seed=12))
    ids = torch.randint(0, model.args.vocab_size, (2, 5))
    for kw, message in ((dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=500), "exceeds"),
                        (dict(max_new_tokens=3, eos_token_id=10**6), "eos_token_id"),
                        (dict(max_new_tokens=3, do_sample=True, top_p=0.0), "top_p")):
        with pytest.raises(ValueError, match=message):
            model.stream(ids, **kw)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.stream(ids + model.args.vocab_size, 3)


def test_streams_running_at_once_keep_their_own_caches(monkeypatch):
    """Two streams advanced in turn, and a generate between their steps, each give their own tokens: a stream's
    KV cache is busy until it ends, so generate's kept caches (graphs.DecodeSlots: one kept, here as on a GPU)
    hand it to no other call; once ended it is kept for the next."""
    from cqil_kernels.graphs import DecodeSlots

    model = CQILLlama.from_pretrained(random_hf_model(seed=13), cqil=CQILConfig([[1, 2], [3, 4]], bypass=1))
    a = torch.randint(0, model.args.vocab_size, (1, 7), generator=torch.Generator().manual_seed(4))
    b = torch.randint(0, model.args.vocab_size, (1, 5), generator=torch.Generator().manual_seed(5))
    want_a, want_b = model.generate(a, 10).cpu(), model.generate(b, 10).cpu()
    slots = DecodeSlots(lambda model, cache: model.decoder(cache, check_tokens=False))
    used = []

    def generation_cache(batch, length):
        used.append(slots.take(model, batch, length))
        return used[-1]

    monkeypatch.setattr(model, "generation_cache", generation_cache)
    first, second = model.stream(a, 10), model.stream(b, 10)
    got_a, got_b = [], []
    for step in range(10):
        got_a.append(next(first))
        got_b.append(next(second))
        if step == 4:
            assert torch.equal(model.generate(b, 10).cpu(), want_b)
    assert next(first, None) is None and next(second, None) is None
    assert torch.equal(torch.cat([a.cpu(), torch.stack(got_a, 1)], 1), want_a)
    assert torch.equal(torch.cat([b.cpu(), torch.stack(got_b, 1)], 1), want_b)
    assert len({id(cache) for cache, _ in used}) == 3 and not any(cache.busy for cache, _ in used)
    assert torch.equal(model.generate(b, 10).cpu(), want_b)
    assert used[-1][0] is used[-2][0]  # the cache of the generate between the steps: ended, so kept and taken


def test_a_dropped_stream_frees_its_cache():
    """A stream left before its end (a user's stop condition) gives its cache back once dropped."""
    model = CQILLlama.from_pretrained(random_hf_model(seed=13))
    ids = torch.randint(0, model.args.vocab_size, (1, 6))
    made = []
    real = model.generation_cache

    def generation_cache(batch, length):
        made.append(real(batch, length))
        return made[-1]

    model.generation_cache = generation_cache
    steps = model.stream(ids, 8)
    next(steps)
    assert made[0][0].busy
    steps.close()
    assert not made[0][0].busy


@pytest.mark.parametrize("finish_at", [0, 3, 8, 9])
def test_generation_stops_after_the_step_where_every_row_finished(finish_at, monkeypatch):
    """The all-finished flag is read one step late (so the host never waits for the step it has just
    enqueued): the output still ends at the step where the last row emitted eos, and at most one decode
    step runs past it. finish_at: the new step at which the second row first emits the eos token."""
    model = CQILLlama.from_pretrained(random_hf_model(seed=12))
    # prompts whose greedy continuation of row 1 has new tokens at steps 0, 3, 8 and 9
    ids = torch.randint(0, model.args.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    free = model.generate(ids, 10)
    eos = [int(free[0, 7]), int(free[1, 6 + finish_at])]  # row 0 ends at its 2nd step at the latest
    # each row's first eos step (10: none, the row runs to the end)
    first = [int(torch.cat([torch.isin(free[r, 6:], torch.tensor(eos)).nonzero().flatten(), torch.tensor([10])])[0])
             for r in range(2)]
    last = max(first)
    assert first[1] == finish_at and first[0] <= 1  # the case this parameter is for
    decodes = []
    decoder = model.decoder

    def counting(cache, check_tokens=True):
        step = decoder(cache, check_tokens)
        return lambda tokens: decodes.append(1) or step(tokens)

    monkeypatch.setattr(model, "decoder", counting)
    out = model.generate(ids, 10, eos_token_id=eos)
    assert out.shape[1] == 6 + min(last + 1, 10)
    for r in range(2):
        assert torch.equal(out[r, :7 + first[r]], free[r, :7 + first[r]])
        assert (out[r, 7 + first[r]:] == eos[0]).all()  # finished rows repeat the first eos id
    assert len(decodes) == min(last + 1, 9)  # the steps through the last eos, and one more to notice it


@pytest.mark.parametrize("bad, exc, message", [
    ([[1, 2, 3]], TypeError, "must be a torch.Tensor"),
    (torch.tensor([[1.0, 2.0]]), TypeError, "integer token ids"),
    (torch.tensor([1, 2, 3]), ValueError, "must be 2-D"),
    (torch.tensor([[1, 97]]), ValueError, "token id 97, outside the vocabulary"),
    (torch.tensor([[-1, 2]]), ValueError, "token id -1"),
    (torch.zeros(1, 0, dtype=torch.long), ValueError, "empty"),
])
def test_bad_input_ids(bad, exc, message):
    model = CQILLlama.from_pretrained(random_hf_model())
    with pytest.raises(exc, match=message):
        model(bad)
    with pytest.raises(exc, match=message):
        model.generate(bad, 2)


def test_generation_limits_and_bad_arguments():
    model = CQILLlama.from_pretrained(random_hf_model(max_position_embeddings=32))
    ids = torch.randint(0, 97, (1, 20))
    with pytest.raises(ValueError, match=r"20 tokens\) \+ max_new_tokens \(13\) = 33 exceeds "
                                         r"max_position_embeddings \(32\)"):
        model.generate(ids, 13)
    with pytest.raises(ValueError, match="exceed max_position_embeddings"):
        model(torch.randint(0, 97, (1, 33)))
    cache = model.new_cache(1, 22)
    model(ids, cache=cache)
    with pytest.raises(ValueError, match=r"23 positions exceed the KV cache \(22\)"):
        model(ids[:, :3], cache=cache)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        model.generate(ids, 0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        model.generate(ids, 2, do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="top_p must be a number in"):
        model.generate(ids, 2, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="top_k must be an int >= 1"):
        model.generate(ids, 2, do_sample=True, top_k=0)
    with pytest.raises(ValueError, match="eos_token_id 500"):
        model.generate(ids, 2, eos_token_id=500)


@pytest.mark.parametrize("mask, message", [
    (torch.tensor([[1, 1, 0]]), "must be left-padded"),
    (torch.tensor([[0, 0, 0]]), "a row with no tokens"),
    (torch.tensor([[1, 2, 1]]), "only 0"),
    (torch.tensor([[1, 1]]), "does not match"),
])
def test_bad_attention_mask(mask, message):
    model = CQILLlama.from_pretrained(random_hf_model())
    with pytest.raises(ValueError, match=message):
        model.generate(torch.tensor([[1, 2, 3]]), 2, attention_mask=mask)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_narrow_integer_ids_give_the_int64_result(dtype):
    model = CQILLlama.from_pretrained(random_hf_model())
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids.to(dtype)), model(ids), rtol=0, atol=0)
    assert torch.equal(model.generate(ids.to(dtype), 3), model.generate(ids, 3))
    with pytest.raises(TypeError, match="integer token ids"):
        model(ids.to(torch.uint16))


def test_sampling_arguments_at_their_limits():
    import numpy as np

    model = CQILLlama.from_pretrained(random_hf_model())
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(4))
    greedy_out = model.generate(ids, 4)
    # a temperature so small that logits / temperature overflow: a greedy draw, not a NaN
    assert torch.equal(model.generate(ids, 4, do_sample=True, temperature=1e-45, seed=0), greedy_out)
    first = int(greedy_out[0, 5])
    for eos in (np.int64(first), [np.int32(first)], torch.tensor(first), torch.tensor([first, 3])):
        out = model.generate(ids, 4, eos_token_id=eos)
        assert int(out[0, 5]) == first and (out[0, 5:] == first).all()
    for bad, message in ((float("inf"), "temperature must be a finite number"),
                         (float("nan"), "temperature must be a finite number"),
                         ("1", "temperature must be a finite number")):
        with pytest.raises(ValueError, match=message):
            model.generate(ids, 2, do_sample=True, temperature=bad)
    for bad in (2.0, "2", [], True):
        with pytest.raises(ValueError, match="eos_token_id"):
            model.generate(ids, 2, eos_token_id=bad)
    with pytest.raises(ValueError, match="top_p must be a number"):
        model.generate(ids, 2, do_sample=True, top_p="0.5")
    with pytest.raises(ValueError, match="seed must be an int"):
        model.generate(ids, 2, do_sample=True, seed="7")
    with pytest.raises(TypeError, match="generator must be a torch.Generator, got int"):
        model.generate(ids, 2, do_sample=True, generator=7)


def test_sampling_arguments_without_do_sample_warn_that_the_call_is_greedy():
    """As transformers does: top_k, top_p, a temperature, a seed or a generator without do_sample=True are ignored,
    which a user who set them did not mean; the warning points at the caller's line, not at the package."""
    import warnings

    model = CQILLlama.from_pretrained(random_hf_model())
    ids = torch.randint(0, 97, (1, 4), generator=torch.Generator().manual_seed(2))
    greedy = model.generate(ids, 3)
    for kwargs, names in (({"top_k": 5}, "top_k"), ({"temperature": 0.7, "seed": 3}, "temperature, seed"),
                          ({"top_p": 0.9, "generator": torch.Generator()}, "top_p, generator"),
                          ({"temperature": torch.tensor([0.5, 0.7])}, "temperature")):
        with pytest.warns(UserWarning, match=f"^{names} set the sampling, .* this call is greedy") as caught:
            out = model.generate(ids, 3, **kwargs)
        assert torch.equal(out, greedy) and caught[0].filename == __file__
        with pytest.warns(UserWarning, match=f"^{names} set the sampling") as caught:
            list(model.stream(ids, 3, **kwargs))
        assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(ids, 3, temperature=1)
        model.generate(ids, 3, do_sample=True, temperature=0.7, top_k=5, top_p=0.9, seed=3)


def test_a_cache_larger_than_the_memory_is_refused_before_allocating():
    model = CQILLlama.from_pretrained(random_hf_model(max_position_embeddings=128))
    with pytest.raises(MemoryError, match=r"a KV cache of batch 1000000000 x 128 positions needs .* GiB, more than"):
        model.new_cache(10**9, 128)
    assert model.new_cache(2, 128).batch == 2


def test_a_gpu_allocation_asks_nothing_first_and_names_what_did_not_fit(monkeypatch):
    """allocate on a GPU (torch's allocation faked): no query of the allocator or the driver before allocating
    (they cost a replayed prompt host time); torch's out-of-memory error becomes a MemoryError naming what
    did not fit, how much and what is free."""
    from cqil_kernels import model as model_module

    asked, made, real_empty = [], [], torch.empty
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: asked.append("driver") or (5 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda.memory, "memory_stats_as_nested_dict", lambda device: asked.append("stats") or {})

    def empty(shape, device, dtype):
        if math.prod(shape) > 1000:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB\nmore details")
        made.append(shape)
        return real_empty(shape, dtype=dtype)

    monkeypatch.setattr(model_module.torch, "empty", empty)
    gpu = torch.device("cuda", 0)
    assert model_module.allocate((2, 500), torch.bfloat16, gpu, "small", zeroed=False).shape == (2, 500)
    assert made == [(2, 500)] and asked == []
    expected = (r"^a KV cache of batch 9 x 9 positions needs 0.00 GiB, more than the 5.00 GiB free on cuda:0 "
                r"\(CUDA out of memory. Tried to allocate 8.00 GiB\)$")
    with pytest.raises(MemoryError, match=expected):
        model_module.allocate((2, 1001), torch.bfloat16, gpu, "a KV cache of batch 9 x 9 positions", zeroed=False)
    assert asked == ["driver"]


@pytest.mark.parametrize("cqil", GROUPINGS, ids=["none", "groups-d1", "first-layer-mlp_input"])
def test_logits_to_keep_are_the_last_positions(cqil):
    model = CQILLlama.from_pretrained(random_hf_model(seed=9), cqil=cqil)
    ids = torch.randint(0, model.args.vocab_size, (3, 10))
    mask = left_padding_mask(ids, [0, 2, 7])
    with torch.no_grad():
        every = model(ids, mask)
        for keep in (1, 4, 10, 25):
            # the lm_head on fewer rows may sum in another order: fp32 rounding, nothing more
            torch.testing.assert_close(model(ids, mask, logits_to_keep=keep), every[:, -keep:])
        torch.testing.assert_close(model(ids, mask, logits_to_keep=0), every, rtol=0, atol=0)
        cache = model.new_cache(3, 12)
        model(ids, mask, cache=cache)
        assert model(ids[:, :2], cache=cache, logits_to_keep=1).shape == (3, 1, model.args.vocab_size)
        for bad in (-1, 1.0, True, "1"):
            with pytest.raises(ValueError, match="logits_to_keep must be an int >= 0"):
                model(ids, mask, logits_to_keep=bad)


@pytest.mark.parametrize("cqil", GROUPINGS, ids=["none", "groups-d1", "first-layer-mlp_input"])
def test_a_prompt_fed_in_parts_continues_as_in_one_forward(cqil):
    """prefill_chunk: the last position's logits as accurate as one forward's (against float64), the same
    cache bookkeeping, the same tokens; row 2 (10 of 13 positions padding) has first parts of padding only."""
    model = CQILLlama.from_pretrained(random_hf_model(seed=8), cqil=cqil)
    exact = CQILLlama.from_pretrained(random_hf_model(seed=8), cqil=cqil, dtype=torch.float64)
    ids = torch.randint(0, model.args.vocab_size, (3, 13))
    mask = left_padding_mask(ids, [4, 0, 10])
    with torch.no_grad():
        truth = exact(ids, mask)[:, -1]
        whole_cache = model.new_cache(3, 16)
        whole = prefill(model, ids, mask, whole_cache, None)
        expected = model.generate(ids, 8, attention_mask=mask, prefill_chunk=None)
        for chunk in (1, 5, 12, 100):  # parts of padding only (row 2), a last part of one token, one part
            cache = model.new_cache(3, 16)
            got = prefill(model, ids, mask, cache, chunk)
            assert_kernel_close(got, whole, truth, terms=model.args.hidden_size)
            assert cache.length == 13 and int(cache.position) == 13
            assert torch.equal(cache.key_valid, whole_cache.key_valid)
            assert torch.equal(cache.n_tokens, whole_cache.n_tokens)
            for mine, theirs in zip((*cache.k, *cache.v), (*whole_cache.k, *whole_cache.v)):  # the 13 written
                torch.testing.assert_close(mine[..., :13, :], theirs[..., :13, :])
            assert torch.equal(model.generate(ids, 8, attention_mask=mask, prefill_chunk=chunk), expected), chunk


def test_generate_reads_its_prompt_from_the_device_once(monkeypatch):
    """generate checks the whole prompt once (one device read for ids and mask together); its parts go through
    forward_checked, which checks only on the host whether they fit the cache (it read the device once per part
    as well), and so do its decode steps. model(...) and a decoder made for the user still check each call."""
    from cqil_kernels import generation

    model = CQILLlama.from_pretrained(random_hf_model(seed=8))
    ids = torch.randint(0, model.args.vocab_size, (2, 11))
    mask = left_padding_mask(ids, [3, 0])
    reads = []
    read = generation._read
    monkeypatch.setattr(generation, "_read", lambda stats: reads.append(len(stats)) or read(stats))
    with torch.no_grad():
        out = model.generate(ids, 3, attention_mask=mask, prefill_chunk=4)  # three parts, then two decode steps
        assert reads == [2]  # nor do its decode steps read their tokens (the model's own argmax)
        model(ids, mask)
        assert reads == [2, 2]
        cache = model.new_cache(2, 12)
        model.decoder(cache)(torch.tensor([1, 2]))  # a decoder of the user's checks what it is given
        assert reads == [2, 2, 1]
        cache = model.new_cache(2, 12)
        with pytest.raises(ValueError, match="13 positions exceed the KV cache"):
            model.forward_checked(torch.zeros(2, 13, dtype=torch.long), None, cache, 1)
    monkeypatch.undo()
    assert torch.equal(out, model.generate(ids, 3, attention_mask=mask, prefill_chunk=None))


def test_bad_prefill_chunk_is_refused():
    model = CQILLlama.from_pretrained(random_hf_model(seed=1))
    ids = torch.zeros(1, 4, dtype=torch.long)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="prefill_chunk must be an int >= 1 or None"):
            model.generate(ids, 2, prefill_chunk=bad)


def test_a_row_of_padding_only_is_refused_without_a_cache_and_fed_with_one():
    model = CQILLlama.from_pretrained(random_hf_model(seed=1))
    ids = torch.zeros(2, 4, dtype=torch.long)
    mask = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match="attention_mask has a row with no tokens"):
        model(ids, mask)
    with torch.no_grad():
        cache = model.new_cache(2, 6)
        assert model(ids, mask, cache=cache).isfinite().all()  # the first part of a left-padded prompt
        assert cache.n_tokens.tolist() == [0, 4]
    with pytest.raises(ValueError, match="attention_mask has a row with no tokens"):
        model.generate(ids, 2, attention_mask=mask)  # a whole prompt still needs a token per row


def test_the_eos_benchmarks_baseline_is_the_old_loop():
    """benchmarks/generate_eos.py times generate against the loop it had before (the flag read at once):
    the same tokens with eos firing and with an eos the run never emits."""
    bench = import_benchmark("generate_eos")
    model = CQILLlama.from_pretrained(random_hf_model(seed=12))
    ids = torch.randint(0, model.args.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    free = model.generate(ids, 10)
    never = bench.unused_token(free[:, 6:], model.args.vocab_size)
    assert never not in free[:, 6:].tolist()[0] + free[:, 6:].tolist()[1]
    for eos in (never, int(free[1, 9]), int(free[0, 7])):
        assert torch.equal(bench.per_step_wait_generate(model, ids, 10, eos), model.generate(ids, 10, eos_token_id=eos))


def test_the_eos_benchmarks_baseline_lets_its_kept_cache_go(monkeypatch):
    """The old loop takes generate's kept cache (graphs.DecodeSlots, here as on a GPU) and lets it go as generate
    does: each call takes the same cache again. A cache left busy made every later call a new cache and decode
    step, an eager step and a capture, which the old loop's timing then held."""
    from cqil_kernels.graphs import DecodeSlots

    bench = import_benchmark("generate_eos")
    model = CQILLlama.from_pretrained(random_hf_model(seed=12))
    ids = torch.randint(0, model.args.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    slots, taken = DecodeSlots(lambda model, cache: model.decoder(cache, check_tokens=False)), []

    def generation_cache(batch, length):
        taken.append(slots.take(model, batch, length))
        return taken[-1]

    monkeypatch.setattr(model, "generation_cache", generation_cache)
    for _ in range(3):
        bench.per_step_wait_generate(model, ids, 4, bench.unused_token(ids, model.args.vocab_size))
    assert len(taken) == 3 and all(slot is taken[0] for slot in taken) and not taken[0][0].busy


def test_input_checks_read_the_device_once(monkeypatch):
    """Token ids and mask are checked with one read of device values (on CUDA each read waits for the GPU
    before the forward's first launch): no tensor is turned into a Python bool or number on its own."""
    from cqil_kernels.generation import check_inputs

    ids = torch.tensor([[0, 5, 9], [3, 4, 96]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    reads = []
    real_tolist = torch.Tensor.tolist

    def counted(t):
        reads.append(t.shape)
        return real_tolist(t)

    def refused(*args):
        raise AssertionError("a device value read on its own")

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    monkeypatch.setattr(torch.Tensor, "__bool__", refused)
    monkeypatch.setattr(torch.Tensor, "item", refused)
    got_ids, got_mask = check_inputs(ids, 97, mask, empty_rows=False)
    assert len(reads) == 1 and got_mask.dtype == torch.bool and torch.equal(got_ids, ids)
    for bad_mask, message in ((torch.tensor([[0, 2, 1], [1, 1, 1]]), "only 0"), (torch.tensor([[0, 0, 0], [1, 1, 1]]),
                              "no tokens"), (torch.tensor([[1, 0, 1], [1, 1, 1]]), "left-padded")):
        with pytest.raises(ValueError, match=message):
            check_inputs(ids, 97, bad_mask)
    check_inputs(ids, 97, torch.tensor([[0, 0, 0], [1, 1, 1]]), empty_rows=True)  # a part of a prompt
    with pytest.raises(ValueError, match="token id 96, outside the vocabulary"):
        check_inputs(ids, 96, mask)
    assert len(reads) == 6


def test_late_input_checks_raise_what_check_inputs_raises():
    """check_inputs_late: inputs on the GPU give an InputCheck whose wait() raises check_inputs' ValueError (ids
    outside the vocabulary first, then the mask's problems); on the host, or with late=False, the same errors
    come at once. The type and shape checks always raise at once."""
    from cqil_kernels.generation import check_inputs, check_inputs_late

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = torch.tensor([[0, 5, 9], [3, 4, 96]])
    cases = [(ids, None, 96, "token id 96, outside the vocabulary"),
             (torch.tensor([[-2, 5, 9], [3, 4, 96]]), torch.tensor([[0, 2, 1], [1, 1, 1]]), 97, "token id -2"),
             (ids, torch.tensor([[0, 2, 1], [1, 1, 1]]), 97, "only 0"),
             (ids, torch.tensor([[0, 0, 0], [1, 1, 1]]), 97, "no tokens"),
             (ids, torch.tensor([[1, 0, 1], [1, 1, 1]]), 97, "left-padded")]
    for on in {"cpu", device}:
        for bad_ids, mask, vocab, message in cases:
            bad_ids, mask = bad_ids.to(on), None if mask is None else mask.to(on)
            with pytest.raises(ValueError, match=message):
                check_inputs(bad_ids, vocab, mask)
            with pytest.raises(ValueError, match=message):
                check_inputs_late(bad_ids, vocab, mask, late=False)
            with pytest.raises(ValueError, match=message):
                _, _, check = check_inputs_late(bad_ids, vocab, mask)
                assert (check is not None) == (on == "cuda")
                check.wait()
        got_ids, got_mask, check = check_inputs_late(ids.to(on).int(), 97, torch.tensor([[0, 1, 1], [1, 1, 1]]).to(on))
        assert (check is not None) == (on == "cuda") and got_ids.dtype == torch.int64 and got_mask.dtype == torch.bool
        if check is not None:
            check.wait()  # good inputs: nothing raised
        with pytest.raises(ValueError, match="must be 2-D"):
            check_inputs_late(ids[0].to(on), 97)
