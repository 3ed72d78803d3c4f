"""graphs.py: prompt-length buckets and the padded prefill the prefill graphs capture (CPU: the same padded
step run eagerly under TRITON_INTERPRET=1), and on CUDA the captured graphs against the eager path."""

import contextlib
import dataclasses
import threading
import time

import pytest
import torch

from cqil_kernels import CQILConfig, CQILLlama, fused, generation, graphs
from cqil_kernels.graphs import MAX_GRAPHS, DecodeSlots, PrefillGraphs, bucket
from cqil_kernels.ops._common import CAPTURE_LOCK

from conftest import import_benchmark, left_padding_mask, random_hf_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GROUPINGS = {
    "none": CQILConfig(),
    "P3-d1-residual": CQILConfig(groups=((1, 2, 3),), bypass=1),
    "P2-d1-mlp_input": CQILConfig(groups=((2, 3), (4, 5)), bypass=1, bypass_mode="mlp_input"),
}


def _model(cqil, dtype=torch.float32, **overrides):
    # 4 layers where the grouping fits in them (6 for P2-d1-mlp_input): what these tests check does not grow
    # with depth, and the interpreter's time does
    overrides = {"num_hidden_layers": 4 if all(max(g) < 4 for g in cqil.groups) else 6, **overrides}
    model = CQILLlama.from_pretrained(random_hf_model(seed=5, **overrides), cqil=cqil, device=DEVICE, dtype=dtype)
    model.backend = "triton"
    return model


def test_buckets():
    assert [bucket(T) for T in (1, 16, 17, 64, 65, 72, 73, 512, 513, 4095, 4096)] == \
        [16, 16, 32, 64, 72, 72, 80, 512, 576, 4096, 4096]
    lengths = range(1, 4097)
    buckets = [bucket(T) for T in lengths]
    assert all(b >= T and bucket(b) == b for T, b in zip(lengths, buckets))
    assert all(b1 <= b2 for b1, b2 in zip(buckets, buckets[1:]))
    assert max((b - T) / T for T, b in zip(lengths, buckets) if T > 64) <= 0.125
    assert len(set(buckets)) == 4 + 8 * 6  # 16..64, then eight per octave from 64 to 4096
    for bad in (0, -3, 2.0, True, "16"):
        with pytest.raises(ValueError, match="prompt length"):
            bucket(bad)


def _stand_in(V: int):
    """A prefill graph step that runs nothing and returns zero logits of the padded step's shape, for tests of which
    bucket serves which call (each real step is seconds under the interpreter)."""
    def step(model, ids, valid, cache, rows):
        return torch.zeros(ids.shape[0], ids.shape[1] if rows is None else rows.numel() // ids.shape[0], V,
                           device=ids.device)
    return step


def _eager(model, ids, mask, keep, max_seq):
    cache = model.new_cache(ids.shape[0], max_seq)
    logits = fused.step(model, ids, mask, cache, keep)
    cache.length += ids.shape[1]
    return logits, cache


@pytest.mark.parametrize("name, keep, pads", [("none", 0, None), ("P3-d1-residual", 1, [0, 5, 12]),
                                               ("P2-d1-mlp_input", 3, [0, 13, 4])])
def test_padded_prefill_equals_the_step_and_hands_over_the_cache(name, keep, pads):
    """The prompt padded to its bucket gives the unpadded step's logits and cache (the padding's keys are
    never taken), and decoding on from the handed-over cache gives the same logits; with left padding, also
    a row that is all padding (the first part of a prompt fed in parts)."""
    model = _model(GROUPINGS[name])
    prefill = PrefillGraphs(model, fused.padded_step, capture=False)
    ids = torch.randint(0, model.args.vocab_size, (3, 13), device=DEVICE)
    valid = left_padding_mask(ids, pads).bool() if pads else None
    with torch.no_grad():
        expected, eager_cache = _eager(model, ids, valid, keep, 20)
        cache = model.new_cache(3, 20)
        got = prefill(model, ids, valid, cache, keep)
        cache.length += 13
        assert got.shape == expected.shape == (3, keep or 13, model.args.vocab_size)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        (k, v), = cache.runs
        (k_eager, v_eager), = eager_cache.runs
        torch.testing.assert_close(k[..., :13, :], k_eager[..., :13, :])
        torch.testing.assert_close(v[..., :13, :], v_eager[..., :13, :])
        assert torch.equal(cache.key_valid, eager_cache.key_valid)
        assert torch.equal(cache.n_tokens, eager_cache.n_tokens) and int(cache.position) == 13
        token = expected[:, -1].argmax(-1)[:, None]
        torch.testing.assert_close(model(token, cache=cache), model(token, cache=eager_cache), rtol=1e-5, atol=1e-5)
    assert list(prefill.buckets) == [(3, 16, keep, None)]


@pytest.mark.parametrize("name, keep, pads", [("P3-d1-residual", 0, ([0, 3, 11], [0, 0, 4])),
                                               ("P2-d1-mlp_input", 2, None)])
def test_prompts_after_a_prefix_run_padded_in_the_callers_cache(name, keep, pads):
    """A conversation's turns into one cache: each turn's prompt padded to its bucket runs in the caller's
    cache after what it holds and gives the unpadded step's logits and cache; the padding's slots are given
    back (the next turn and the next token go where the unpadded step puts them). pads: left padding of
    the first two turns (a left-padded prompt in parts: row 2's first part is all padding)."""
    model = _model(GROUPINGS[name])
    prefill = PrefillGraphs(model, fused.padded_step, capture=False)
    g = torch.Generator().manual_seed(3)
    B = 3 if pads else 2  # three rows for three paddings; two where none is padded (each row costs interpreter time)
    turns = [torch.randint(0, model.args.vocab_size, (B, T), generator=g).to(DEVICE) for T in (11, 9, 13)]
    masks = [left_padding_mask(turn, p).bool() for turn, p in zip(turns, pads)] + [None] if pads else [None] * 3
    with torch.no_grad():
        cache, eager_cache = model.new_cache(B, 60), model.new_cache(B, 60)
        for ids, valid in zip(turns, masks):
            expected = fused.step(model, ids, valid, eager_cache, keep)
            eager_cache.length += ids.shape[1]
            got = prefill(model, ids, valid, cache, keep)
            cache.length += ids.shape[1]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            n = cache.length
            assert int(cache.position) == n and torch.equal(cache.n_tokens, eager_cache.n_tokens)
            assert torch.equal(cache.key_valid, eager_cache.key_valid)  # the padding's slots stay invalid
            for (k, v), (k_eager, v_eager) in zip(cache.runs, eager_cache.runs):
                torch.testing.assert_close(k[..., :n, :], k_eager[..., :n, :], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(v[..., :n, :], v_eager[..., :n, :], rtol=1e-5, atol=1e-5)
        token = expected[:, -1].argmax(-1)[:, None]
        torch.testing.assert_close(model(token, cache=cache), model(token, cache=eager_cache), rtol=1e-5, atol=1e-5)
    # turns 2 and 3 (9 and 13 tokens) share the 16 bucket bound to this cache; turn 1 took the scratch one
    assert list(prefill.buckets) == [(B, 16, keep, None), (B, 16, keep, id(cache))]
    assert prefill.buckets[(B, 16, keep, id(cache))].calls == 2


def _padded_prompts_off_cuda(model, monkeypatch) -> None:
    """Off CUDA the model runs prompts unpadded: route its forwards through uncaptured buckets, as CUDA's run."""
    if DEVICE == "cpu":
        prefill = PrefillGraphs(model, fused.padded_step, capture=False)
        monkeypatch.setattr(fused.TritonBackend, "forward",
                            lambda self, model, ids, valid, cache, keep=0, check=None:
                            prefill(model, ids, valid, cache, keep, check))


@pytest.mark.parametrize("where", ["scratch", "bound"])
def test_a_prompt_interrupted_after_its_padded_step_leaves_the_cache_as_it_was(where, monkeypatch):
    """The prompt buckets' two ways into the caller's cache, a scratch bucket's prompt handed over to an empty
    cache and a bucket bound to the cache after a prefix, interrupted once the padded step (and the hand-over)
    ran: the cache is as it was (KVCache.restore, from the model's forward), and the next prompt's logits
    equal those of a cache that never saw the interrupted one, bit for bit."""
    model = _model(GROUPINGS["P3-d1-residual"])
    _padded_prompts_off_cuda(model, monkeypatch)
    g = torch.Generator().manual_seed(9)
    prefix, prompt, other = (torch.randint(0, model.args.vocab_size, (2, T), generator=g).to(DEVICE)
                             for T in (5, 7, 7))
    step, drop = graphs._Bucket.forward, PrefillGraphs._drop_unbound
    ran = []

    def step_then_mark(self, step_fn):
        out = step(self, step_fn)
        ran.append(True)
        return out

    def interrupted(self):  # the host work after the step (before a new bucket it runs too, unharmed)
        if ran:
            raise KeyboardInterrupt("injected after the step")
        drop(self)

    with torch.no_grad():
        failed, clean = model.new_cache(2, 40), model.new_cache(2, 40)
        if where == "bound":
            for cache in (failed, clean):
                model(prefix, cache=cache)
        before = [t.clone() for t in (failed.key_valid, failed.n_tokens, failed.position)]
        monkeypatch.setattr(graphs._Bucket, "forward", step_then_mark)
        monkeypatch.setattr(PrefillGraphs, "_drop_unbound", interrupted)
        with pytest.raises(KeyboardInterrupt, match="injected"):
            model(other, cache=failed)
        monkeypatch.setattr(PrefillGraphs, "_drop_unbound", drop)
        assert ran and failed.length == (5 if where == "bound" else 0)
        for got, want in zip((failed.key_valid, failed.n_tokens, failed.position), before):
            assert torch.equal(got, want)
        got, want = model(prompt, cache=failed), model(prompt, cache=clean)
    assert torch.equal(got, want)


def test_a_prompt_whose_input_check_fails_after_its_step_leaves_the_cache_as_it_was(monkeypatch):
    """A prompt whose values are read once its step is queued (generation.InputCheck: CUDA inputs), into an empty
    cache (a scratch bucket) and after a prefix (a bucket bound to the cache): the bucket clamps the ids as it
    loads them, so the step reads no row outside the embedding table (off CUDA torch's lookup would raise
    IndexError); the check's ValueError reaches the caller with the cache as it was, and the next prompt's logits
    equal those of a cache that never saw the bad ones, bit for bit."""
    model = _model(GROUPINGS["P3-d1-residual"])
    V = model.args.vocab_size
    _padded_prompts_off_cuda(model, monkeypatch)
    g = torch.Generator().manual_seed(9)
    prefix, prompt = (torch.randint(0, V, (1, T), generator=g).to(DEVICE) for T in (5, 7))
    bad = prompt.clone()
    bad[0, 2], bad[0, 6] = V + 5, -3
    step, seen = graphs._Bucket.forward, []

    def look_then_step(self, step_fn):
        seen.append(self.ids.clone())
        return step(self, step_fn)

    def refused(cache):
        """The bad prompt into `cache`: refused after its step ran on clamped ids, the cache as it was."""
        before = [cache.length, *(t.clone() for t in (cache.key_valid, cache.n_tokens, cache.position))]
        # ids on the host are checked at once: off CUDA the check is made as check_inputs_late makes it there
        check = (generation.check_inputs_late(bad, V)[2] if DEVICE == "cuda"
                 else generation.InputCheck(bad, None, False, V))
        seen.clear()
        monkeypatch.setattr(graphs._Bucket, "forward", look_then_step)
        with pytest.raises(ValueError, match=rf"token id -3, outside the vocabulary \[0, {V}\)"):
            model.forward_checked(bad, None, cache, 0, check)
        monkeypatch.setattr(graphs._Bucket, "forward", step)
        assert len(seen) == 1 and seen[0].min() >= 0 and seen[0].max() == V - 1
        assert cache.length == before[0]
        for got, want in zip((cache.key_valid, cache.n_tokens, cache.position), before[1:]):
            assert torch.equal(got, want)

    with torch.no_grad():
        failed, clean = model.new_cache(1, 40), model.new_cache(1, 40)
        refused(failed)  # into the empty cache: the scratch bucket
        for cache in (failed, clean):
            model(prefix, cache=cache)
        refused(failed)  # after the prefix: the bucket bound to the cache
        got, want = model(prompt, cache=failed), model(prompt, cache=clean)
    assert torch.equal(got, want)


def test_a_kept_cache_takes_its_prompt_straight_in():
    """An empty cache kept for later calls (KVCache.long_lived: generate's, through DecodeSlots) binds its
    prompt's bucket as a cache after a prefix does: no scratch, nothing copied over, the scratch path's
    logits and cache (left padding included). A kept cache without room for the bucket takes the scratch
    path."""
    model = _model(GROUPINGS["P3-d1-residual"])
    prefill = PrefillGraphs(model, fused.padded_step, capture=False)
    ids = torch.randint(0, model.args.vocab_size, (2, 13), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    valid = left_padding_mask(ids, [0, 4]).bool()
    with torch.no_grad():
        plain, kept = model.new_cache(2, 20), model.new_cache(2, 20)
        kept.long_lived = True
        outs = []
        for cache in (plain, kept):
            outs.append(prefill(model, ids, valid, cache, 1))
            cache.length += 13
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
        entry = prefill.buckets[(2, 16, 1, id(kept))]
        assert entry.scratch is None and entry.target() is kept
        assert int(kept.position) == 13 and torch.equal(kept.n_tokens, plain.n_tokens)
        assert torch.equal(kept.key_valid, plain.key_valid)  # the padding's slots invalid, as never written
        for (k, v), (k_plain, v_plain) in zip(kept.runs, plain.runs):
            torch.testing.assert_close(k[..., :13, :], k_plain[..., :13, :], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v[..., :13, :], v_plain[..., :13, :], rtol=1e-5, atol=1e-5)
        token = outs[0][:, -1].argmax(-1)[:, None]
        torch.testing.assert_close(model(token, cache=kept), model(token, cache=plain), rtol=1e-5, atol=1e-5)
        small = model.new_cache(2, 14)  # kept, but 14 positions cannot take the 16 bucket
        small.long_lived = True
        torch.testing.assert_close(prefill(model, ids, valid, small, 1), outs[0], rtol=1e-5, atol=1e-5)
        assert (2, 16, 1, id(small)) not in prefill.buckets and int(small.position) == 13
    assert list(prefill.buckets) == [(2, 16, 1, id(kept)), (2, 16, 1, None)]


class _StandInGraph:
    """What the replay of a bucket captured before a parameter was replaced by hand does, on any device (the
    tests' PrefillGraphs capture nothing off CUDA): its output buffer gets the old weights' logits (NaN here)
    and a bound cache's bookkeeping moves on as the step's would."""

    def __init__(self, entry, cache, T: int):
        self.entry, self.cache, self.T, self.replays = entry, cache, T, 0

    def replay(self):
        self.replays += 1
        self.entry.out.fill_(float("nan"))
        if self.cache is not None:
            L = self.cache.length
            self.cache.key_valid[:, L:L + self.T] = True
            self.cache.n_tokens.add_(self.T)
            self.cache.position.fill_(L + self.T)
            self.cache.start.fill_(L)


@pytest.mark.parametrize("bound", [False, True])
def test_a_replay_that_read_weights_replaced_by_hand_is_run_again(bound):
    """The scan of the packed weights' bindings runs after the replay is queued: a replay it finds stale (a
    parameter's data replaced by hand since the capture) is dropped, a bound cache's bookkeeping put back,
    and the prompt run again on the current weights; a replay it finds current is returned as is."""
    model = _model(GROUPINGS["P3-d1-residual"])
    prefill = PrefillGraphs(model, fused.padded_step, capture=False)
    ids = torch.randint(0, model.args.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    cache = model.new_cache(1, 40)
    cache.long_lived = bound  # a kept cache binds its prompt's bucket; another takes the scratch path
    with torch.no_grad():
        prefill(model, ids, None, cache, 1)  # makes the bucket (run eagerly here)
        (entry,) = prefill.buckets.values()
        assert (entry.target is not None) == bound
        entry.graph = graph = _StandInGraph(entry, cache if bound else None, 12)
        entry.out = torch.zeros(1, 1, model.args.vocab_size, device=DEVICE)
        cache.clear()
        assert prefill(model, ids, None, cache, 1).isnan().all() and graph.replays == 1  # current: as replayed
        weight = model.layers[2].mlp.down_proj.weight
        weight.data = weight.data * 2  # the binding's data_ptr changes; the rest of the signature does not
        cache.clear()
        got = prefill(model, ids, None, cache, 1)
        assert graph.replays == 2 and list(prefill.buckets.values()) != [entry]
        expected, clean = _eager(model, ids, None, 1, 40)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert int(cache.position) == 12 and torch.equal(cache.n_tokens, clean.n_tokens)
        assert torch.equal(cache.key_valid, clean.key_valid)


@cuda
@pytest.mark.parametrize("bound", [False, True])
@pytest.mark.parametrize("calls_before", [1, 2])
def test_cuda_a_parameter_replaced_by_hand_between_prompts(bound, calls_before):
    """A parameter's data replaced by hand after a bucket's eager run (the next call, which would capture,
    checks the whole signature first: the weights are packed anew outside any capture, and the graphs made
    again) or after its capture (the next call replays the graph, which reads the old weights: the scan
    after it finds them stale and the prompt runs again). Either way the logits and the cache equal a model
    whose graphs were never captured, bit for bit, and the graphs hold the model's packing."""
    model = _model(GROUPINGS["P3-d1-residual"])
    ids = torch.randint(0, model.args.vocab_size, (1, 12), device=DEVICE)
    with torch.no_grad():
        cache = model.new_cache(1, 40)
        cache.long_lived = bound
        for _ in range(calls_before):  # eager, then capture
            cache.clear()
            model(ids, cache=cache, logits_to_keep=1)
        weight = model.layers[2].mlp.down_proj.weight
        weight.data = weight.data * 2
        cache.clear()
        got = model(ids, cache=cache, logits_to_keep=1)
        assert model.accelerator.graphs.packed is model.packed and model.packed.is_current()
        cache.clear()
        again = model(ids, cache=cache, logits_to_keep=1)  # captured or replayed on the new weights
        model.accelerator.clear_graphs()
        fresh = model.new_cache(1, 40)
        fresh.long_lived = bound
        want = model(ids, cache=fresh, logits_to_keep=1)  # a bucket's first prompt: the padded step, eagerly
    assert torch.equal(got, want) and torch.equal(again, want)
    for got_t, want_t in ((cache.key_valid, fresh.key_valid), (cache.n_tokens, fresh.n_tokens),
                          (cache.position, fresh.position)):
        assert torch.equal(got_t, want_t)
    for (k, v), (k_want, v_want) in zip(cache.runs, fresh.runs):
        assert torch.equal(k[..., :12, :], k_want[..., :12, :]) and torch.equal(v[..., :12, :], v_want[..., :12, :])


@cuda
def test_cuda_generate_after_a_parameter_replaced_by_hand():
    """generate takes its kept cache without scanning the weights' bindings; its prompt's scan repacks
    them, and the kept decode step, captured on the old weights, is made again on the new ones: the tokens
    and a decode step's logits equal those of a model loaded with the new weights, bit for bit. warm_up,
    whose decode steps come before any prompt, scans first."""
    model = _model(GROUPINGS["P3-d1-residual"])
    ids = torch.randint(0, model.args.vocab_size, (1, 12), device=DEVICE)
    for _ in range(2):  # the prompt bucket and the decode step captured
        model.generate(ids, 6)
    cache, decode = model.accelerator.slots.slots[0]
    assert decode.graph is not None
    weight = model.layers[2].mlp.down_proj.weight
    weight.data = weight.data * 2
    got = model.generate(ids, 6)  # the kept slot; its step made again: eager, captured, replayed
    slot = model.accelerator.slots.slots[0]
    assert slot[0] is cache and slot[1] is decode and decode.packed is model.packed and decode.graph is not None
    fresh = _model(GROUPINGS["P3-d1-residual"])
    fresh.layers[2].mlp.down_proj.weight.data = model.layers[2].mlp.down_proj.weight.data.clone()
    want = fresh.generate(ids, 6)
    assert torch.equal(got, want)
    logits = []
    for m, (c, d) in ((model, (cache, decode)), (fresh, fresh.accelerator.slots.slots[0])):
        with torch.no_grad():  # the followed step's graph against the fresh model's
            c.clear()
            m(ids, cache=c, logits_to_keep=1)
            logits.append(d(want[:, 12]).clone())
    assert torch.equal(logits[0], logits[1])
    assert torch.equal(model.generate(ids, 6), want)  # the next call: a new slot, on the new packing
    weight = model.layers[3].mlp.up_proj.weight
    weight.data = weight.data * 2
    model.warm_up(1, 20, prompt_lengths=[12])  # scans first: its decode steps run before any prompt
    cache, decode = model.accelerator.slots.slots[0]
    assert decode.packed is model.packed and decode.graph is not None


def test_the_prompt_mix_benchmarks_lengths_and_percentiles():
    """benchmarks/prompt_mix.py: its prompts' lengths (log-uniform, fixed by the seed, within the bounds, over
    many buckets) and its nearest-rank percentile; bad bounds refused before anything runs."""
    mix = import_benchmark("prompt_mix")
    lengths = mix.prompt_lengths(400, 16, 2048, seed=1)
    assert lengths == mix.prompt_lengths(400, 16, 2048, seed=1) != mix.prompt_lengths(400, 16, 2048, seed=2)
    assert min(lengths) >= 16 and max(lengths) <= 2048 and len({bucket(T) for T in lengths}) > 30
    assert sum(T <= 181 for T in lengths) > 100  # half of the log range below sqrt(16 * 2048) = 181
    assert mix.percentile([5.0, 1.0, 3.0, 2.0, 4.0], 90) == 5.0 and mix.percentile([5.0, 1.0, 3.0], 50) == 3.0
    for bad in ((10, 0, 5), (10, 9, 5), (0, 16, 32)):
        with pytest.raises(ValueError, match="need"):
            mix.prompt_lengths(*bad)


def test_buckets_bound_to_a_cache_go_with_it():
    """Each cache after a prefix gets buckets of its own; once the cache is gone, so are they (the step is a
    stand-in here: what is checked is which bucket serves which call)."""
    model = _model(GROUPINGS["none"])
    prefill = PrefillGraphs(model, _stand_in(model.args.vocab_size), capture=False)
    ids = torch.zeros(1, 9, dtype=torch.long, device=DEVICE)
    one, other = model.new_cache(1, 60), model.new_cache(1, 60)
    keys = {}
    for cache in (one, other):
        prefill(model, ids, None, cache, 1)  # empty: the scratch bucket, then handed over
        cache.length += 9
        prefill(model, ids, None, cache, 1)
        cache.length += 9
        keys[id(cache)] = (1, 16, 1, id(cache))
        assert prefill.buckets[keys[id(cache)]].target() is cache
    assert list(prefill.buckets) == [keys[id(one)], (1, 16, 1, None), keys[id(other)]]  # least recently used first
    del one, other, cache
    prefill(model, ids, None, None, 1)
    assert list(prefill.buckets) == [(1, 16, 1, None)]


def test_a_bucket_of_a_gone_cache_never_serves_the_cache_that_took_its_id():
    """The buckets bound to gone caches are dropped after a prompt; one found under the key of a new cache
    (CPython reuses a freed object's id) before that is not replayed into the new cache."""
    model = _model(GROUPINGS["none"])
    seen, zeros = [], _stand_in(model.args.vocab_size)

    def stand_in(model, ids, valid, cache, rows):
        seen.append(cache)
        return zeros(model, ids, valid, cache, rows)

    prefill = PrefillGraphs(model, stand_in, capture=False)
    ids = torch.zeros(1, 9, dtype=torch.long, device=DEVICE)
    gone, cache = model.new_cache(1, 60), model.new_cache(1, 60)
    gone.length = cache.length = 9
    prefill(model, ids, None, gone, 1)
    key = (1, 16, 1, id(cache))
    prefill.buckets[key] = prefill.buckets.pop((1, 16, 1, id(gone)))  # as if `gone` had had this cache's id
    del gone
    seen.clear()
    prefill(model, ids, None, cache, 1)
    assert seen == [cache] and prefill.buckets[key].target() is cache and list(prefill.buckets) == [key]


def test_bucket_edges_and_plain_forwards():
    """Lengths at and just past a bucket's end, and forwards without a cache."""
    model = _model(GROUPINGS["P3-d1-residual"])
    prefill = PrefillGraphs(model, fused.padded_step, capture=False)
    with torch.no_grad():
        for T in (16, 17, 1):
            ids = torch.randint(0, model.args.vocab_size, (2, T), device=DEVICE)
            expected, _ = _eager(model, ids, None, 0, T)
            torch.testing.assert_close(prefill(model, ids, None, None), expected, rtol=1e-5, atol=1e-5)
    assert list(prefill.buckets) == [(2, 32, 0, None), (2, 16, 0, None)]  # 1 token: the 16 bucket again, used last


def test_the_buckets_of_a_batch_size_share_one_scratch():
    """Prompts into an empty cache run in one scratch per batch size (a power of two of at least SCRATCH_MIN
    positions, at most the model's), not one per bucket: a longer bucket makes a new one and drops the
    buckets captured into the old one; a batch size whose buckets are all gone loses its scratch."""
    model = _model(GROUPINGS["none"], num_hidden_layers=2)
    prefill = PrefillGraphs(model, fused.padded_step, capture=False)
    ids = torch.randint(0, model.args.vocab_size, (2, 70), device=DEVICE)
    with torch.no_grad():
        prefill(model, ids[:1, :5], None, None, 1)  # bucket 16
        first = prefill.scratches[1]
        prefill(model, ids[:1, :40], None, model.new_cache(1, 50), 1)  # bucket 48, handed over to a cache
        prefill(model, ids[:, :5], None, None, 1)  # batch 2: a scratch of its own
        assert first.max_seq == graphs.SCRATCH_MIN == 64 and prefill.scratches[2] is not first
        assert all(b.scratch is prefill.scratches[key[0]] for key, b in prefill.buckets.items())
        got = prefill(model, ids[:1], None, None, 1)  # bucket 72: a scratch of 128 positions (the model's all)
        assert list(prefill.buckets) == [(2, 16, 1, None), (1, 72, 1, None)]  # batch 1's 16 and 48 dropped
        assert prefill.scratches[1].max_seq == 128 and prefill.buckets[1, 72, 1, None].scratch is prefill.scratches[1]
        torch.testing.assert_close(got, _eager(model, ids[:1], None, 1, 70)[0], rtol=1e-5, atol=1e-5)
        got = prefill(model, ids[:1, :5], None, None, 1)  # bucket 16 again, in the long scratch
        assert prefill.buckets[1, 16, 1, None].scratch is prefill.scratches[1]
        torch.testing.assert_close(got, _eager(model, ids[:1, :5], None, 1, 5)[0], rtol=1e-5, atol=1e-5)
        prefill.resize(1)  # batch 2's bucket evicted: its scratch with it
        assert list(prefill.buckets) == [(1, 16, 1, None)] and list(prefill.scratches) == [1]
        prefill.clear()
        assert not prefill.scratches


def test_the_default_limit_keeps_every_bucket_of_a_batch_size():
    """A server's prompts of one batch size, whatever their lengths, keep their graphs by default (with 8 of
    the 52 buckets kept, a mix of lengths ran its prompts eagerly again and again: prompt_mix.py)."""
    assert len({bucket(T) for T in range(1, graphs.MAX_BUCKET + 1)}) == 52 <= MAX_GRAPHS
    assert fused.TritonBackend().prefill_graph_limit == MAX_GRAPHS


def test_a_capture_that_raises_is_never_replayed(monkeypatch):
    """A step whose capture failed keeps no graph: an error propagates and the next call captures anew; out of
    memory warns and leaves the step eager. Captures are thread-local and hold the capture lock (another thread
    waits). (Fakes stand in for torch's CUDA graph: the logic, on the CPU.)"""
    events = []

    class FakeGraph:
        def replay(self):
            events.append("replay")

    def taken_elsewhere():  # whether another thread would wait for the capture lock now
        free = []
        thread = threading.Thread(target=lambda: free.append(CAPTURE_LOCK.acquire(blocking=False)))
        thread.start()
        thread.join()
        if free[0]:
            CAPTURE_LOCK.release()
        return not free[0]

    @contextlib.contextmanager
    def capturing(graph, capture_error_mode="global"):
        events.append(f"capture {capture_error_mode}" + (" locked" if taken_elsewhere() else ""))
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", capturing)
    step = graphs._CapturedLazily()
    step.calls = 1  # the eager first call (on a side stream) is behind it
    failures = [ValueError("bad shape")]

    def fn():
        if failures:
            raise failures.pop()
        events.append("run")
        return torch.ones(2)

    with pytest.raises(ValueError, match="bad shape"):
        step.replay_or_run(fn)
    assert step.graph is None and step.out is None
    assert torch.equal(step.replay_or_run(fn), torch.ones(2)) and step.graph is not None  # captured this time
    assert events == ["capture thread_local locked", "capture thread_local locked", "run", "replay"]
    step = graphs._CapturedLazily()
    step.calls = 1
    failures.append(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    events.clear()
    with pytest.warns(RuntimeWarning, match="no memory to capture a CUDA graph.*Tried to allocate 2.00 GiB"):
        assert torch.equal(step.replay_or_run(fn), torch.ones(2))
    assert step.graph is None and step.eager_only
    step.replay_or_run(fn)
    assert events == ["capture thread_local locked", "run", "run"]  # eager from then on: no second capture


def test_graphs_are_bounded_and_dropped_when_the_model_changes():
    """At most `limit` buckets, the least recently used dropped first; a regrouped or moved model's buckets are
    dropped (the regrouped step's logits are the eager step's); the backend's limit is checked and applied at once.
    Only the regrouped step runs the model (the bookkeeping's calls run a stand-in)."""
    model = _model(GROUPINGS["none"])
    real, stand_in = [False], _stand_in(model.args.vocab_size)
    prefill = PrefillGraphs(model, lambda *args: (fused.padded_step if real[0] else stand_in)(*args), capture=False,
                            limit=2)
    ids = torch.randint(0, model.args.vocab_size, (1, 40), device=DEVICE)
    with torch.no_grad():
        for T in (5, 20, 40, 20):
            prefill(model, ids[:, :T], None, None, 1)
        assert list(prefill.buckets) == [(1, 48, 1, None), (1, 32, 1, None)]  # 16 dropped first, 32 used last
        model.cqil = GROUPINGS["P3-d1-residual"]  # a regrouping: the graphs' stages are gone
        real[0] = True
        got = prefill(model, ids[:, :20], None, None, 1)
        real[0] = False
        assert list(prefill.buckets) == [(1, 32, 1, None)]
        expected, _ = _eager(model, ids[:, :20], None, 1, 20)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        model.to(torch.float64)  # moved weights: repacked at the next step
        model.to(torch.float32)
        prefill(model, ids[:, :20], None, None, 1)
        assert len(prefill.buckets) == 1
    with pytest.raises(ValueError, match="limit"):
        PrefillGraphs(model, fused.padded_step, capture=False, limit=0)
    # the backend's prefill_graph_limit: checked, and applied at once to the buckets held (LRU first out)
    backend = fused.TritonBackend(prefill_graph_limit=3)
    backend.graphs = prefill
    with torch.no_grad():
        for T in (5, 20, 40):
            prefill(model, ids[:, :T], None, None, 1)
    assert prefill.limit == 2 and list(prefill.buckets) == [(1, 32, 1, None), (1, 48, 1, None)]
    backend.prefill_graph_limit = 1
    assert prefill.limit == 1 and list(prefill.buckets) == [(1, 48, 1, None)]
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="limit must be an int >= 1"):
            backend.prefill_graph_limit = bad
    with pytest.raises(ValueError, match="limit must be an int >= 1"):
        fused.TritonBackend(prefill_graph_limit=-1)
    assert backend.prefill_graph_limit == 1 and fused.TritonBackend().prefill_graph_limit == MAX_GRAPHS
    with pytest.raises(ValueError, match="another model"):
        prefill(_model(GROUPINGS["none"]), ids, None, None)


def test_a_bucket_made_in_inference_mode_serves_forwards_outside_it():
    """generate runs under torch.inference_mode; a later model(ids) under no_grad reuses its bucket, whose
    buffers it updates in place (inference tensors would refuse that)."""
    model = _model(GROUPINGS["none"])
    prefill = PrefillGraphs(model, fused.padded_step, capture=False)
    ids = torch.randint(0, model.args.vocab_size, (1, 7), device=DEVICE)
    with torch.inference_mode():
        first = prefill(model, ids, None, None, 1)
    with torch.no_grad():
        torch.testing.assert_close(prefill(model, ids, None, None, 1), first, rtol=0, atol=0)


def test_what_a_prefill_graph_serves(monkeypatch):
    model = _model(GROUPINGS["none"])
    ids = torch.zeros(1, 10, dtype=torch.long, device=DEVICE)
    cache = model.new_cache(1, 30)
    assert PrefillGraphs.serves(model, ids, cache) and PrefillGraphs.serves(model, ids, None)
    cache.length = 14  # a cached prefix with room for the 16-token bucket after it (the caller's cache)
    assert PrefillGraphs.serves(model, ids, cache)
    cache.length = 15  # the padding would pass the cache's end
    assert not PrefillGraphs.serves(model, ids, cache)
    cache.length = 0
    args = model.args
    model.args = dataclasses.replace(args, max_position_embeddings=15)  # 10 tokens' bucket, 16, passes it
    assert not PrefillGraphs.serves(model, ids, None)
    model.args = args
    monkeypatch.setattr(graphs, "MAX_BUCKET", 8)
    assert not PrefillGraphs.serves(model, ids, None)
    with pytest.raises(ValueError, match="at most 8 tokens"):
        PrefillGraphs(model, fused.padded_step, capture=False)(model, ids, None, None)


def test_copy_prompt_checks_its_caches():
    model = _model(GROUPINGS["P3-d1-residual"])
    src, dst = model.new_cache(2, 16), model.new_cache(2, 30)
    with pytest.raises(ValueError, match="length must be in"):
        dst.copy_prompt(src, 17)
    with pytest.raises(ValueError, match="same stages"):
        dst.copy_prompt(model.new_cache(1, 16), 4)
    with model.grouping(CQILConfig()):
        other = model.new_cache(2, 16)
    with pytest.raises(ValueError, match="same stages"):
        dst.copy_prompt(other, 4)
    dst.length = 3
    with pytest.raises(ValueError, match="empty cache"):
        dst.copy_prompt(src, 4)


def _eager_decoder_of(made):
    def decoder_of(model, cache):
        made.append(cache)
        return lambda tokens: model(tokens[:, None], cache=cache)[:, -1]
    return decoder_of


def _taken(slots, model, batch, length):
    """slots.take, then the slot let go as a generate call lets it go when it ends."""
    cache, decode = slots.take(model, batch, length)
    assert cache.busy
    cache.busy = False
    return cache, decode


def test_decode_slots_are_kept_cleared_and_bounded():
    """generate's caches: the smallest kept one of the batch that holds the length, cleared; a new one of
    bucket(length) positions (within max_position_embeddings) when none does; the least recently used
    dropped past the limit; all dropped when the model changes. Each is handed out busy, and the test lets it go
    as generate does when it ends (_taken)."""
    model = _model(GROUPINGS["P3-d1-residual"])
    model.backend = "torch"  # the slots' logic; the fused step's graphs are the CUDA test's
    made = []
    slots = DecodeSlots(_eager_decoder_of(made), limit=2)
    first, decode = _taken(slots, model, 1, 50)
    assert first.max_seq == 64 and len(made) == 1
    assert first.long_lived and not model.new_cache(1, 8).long_lived  # its prompts' graphs bind to it
    with torch.no_grad():
        decode(torch.tensor([3], device=DEVICE))
        model(torch.ones(1, 5, dtype=torch.long, device=DEVICE), cache=first)
    assert first.length == 6 and first.key_valid.any()
    again, decode_again = _taken(slots, model, 1, 60)  # 64 positions hold 60: the same cache, empty again
    assert again is first and decode_again is decode and len(made) == 1
    fresh = model.new_cache(1, 64)
    assert again.length == 0 and int(again.position) == int(again.start) == 0
    assert torch.equal(again.key_valid, fresh.key_valid) and torch.equal(again.n_tokens, fresh.n_tokens)
    bigger, _ = _taken(slots, model, 1, 70)
    assert bigger.max_seq == 72 and len(made) == 2
    layers = model.args.num_hidden_layers
    assert slots.cache_bytes() == 2 * 4 * (64 + 72) * 2 * 8 * layers  # k and v, fp32, positions x kv heads x Dh
    pair, _ = _taken(slots, model, 2, 10)  # a third slot: the 64-position one, used least recently, goes
    assert pair.max_seq == 16 and [c.max_seq for c, _ in slots.slots] == [72, 16]
    assert _taken(slots, model, 1, 60)[0] is bigger  # the 72-position cache holds 60
    assert _taken(slots, model, 1, 121)[0].max_seq == 128  # bucket(121) = 128 = max_position_embeddings
    assert _taken(slots, model, 1, 124)[0].max_seq == 128  # kept: it holds 124
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        _taken(slots, model, 1, 129)
    new_cache = model.new_cache

    def short_of_memory(batch, max_seq):  # room for 100 positions, with nothing else kept
        if max_seq > 100 or len(slots.slots) > 0:
            raise MemoryError("a KV cache of ... needs more than the free memory")
        return new_cache(batch, max_seq)

    model.new_cache = short_of_memory
    tight, _ = _taken(slots, model, 3, 97)  # bucket(97) = 104 does not fit: the kept caches go, then 97 exactly
    assert tight.max_seq == 97 and [c for c, _ in slots.slots] == [tight]
    with pytest.raises(MemoryError, match="free memory"):
        _taken(slots, model, 3, 101)
    strict = DecodeSlots(_eager_decoder_of([]), shrink=False)  # a rank's: the same size on every rank or none
    with pytest.raises(MemoryError, match="free memory"):
        _taken(strict, model, 3, 97)
    del model.new_cache
    model.cqil = GROUPINGS["none"]  # another grouping: every kept cache (its stages) and graph goes
    cache, _ = _taken(slots, model, 1, 60)
    assert cache.stages == model.stages and [c for c, _ in slots.slots] == [cache]
    with pytest.raises(ValueError, match="limit"):
        DecodeSlots(_eager_decoder_of([]), limit=0)
    default = DecodeSlots(_eager_decoder_of([]))  # one kept: a call that needs another cache frees it first
    _taken(default, model, 1, 10)
    other, _ = _taken(default, model, 2, 10)
    assert [c for c, _ in default.slots] == [other]


def test_prompts_of_two_threads_through_one_models_prefill_graphs_each_get_their_own_logits():
    """Thread A's prompt waits inside its step (before the step reads its bucket's input buffer) while thread B's
    prompt of the same bucket comes: B waits for A's call to end (PrefillGraphs.lock), so each gets its own
    logits. Without the lock B's prompt was loaded into the shared buffer and A's step ran it."""
    model = _model(GROUPINGS["none"])
    ids = [torch.randint(0, model.args.vocab_size, (1, T), device=DEVICE) for T in (9, 13)]  # both bucket 16
    with torch.no_grad():
        expected = [PrefillGraphs(model, fused.padded_step, capture=False)(model, x, None, None, 1) for x in ids]
    b_called, got = threading.Event(), {}

    def step(model, input_ids, valid, cache, rows):
        if threading.current_thread().name == "A":
            b_called.wait(10)
            time.sleep(0.3)  # time for B to load its prompt, were it let in
        return fused.padded_step(model, input_ids, valid, cache, rows)

    prefill = PrefillGraphs(model, step, capture=False)

    def run(name, x):
        if name == "B":
            b_called.set()
        with torch.no_grad():
            got[name] = prefill(model, x, None, None, 1)

    a = threading.Thread(target=run, args=("A", ids[0]), name="A", daemon=True)
    a.start()
    time.sleep(0.1)  # A is in its step
    b = threading.Thread(target=run, args=("B", ids[1]), name="B", daemon=True)
    b.start()
    a.join(60)
    b.join(60)
    assert not a.is_alive() and not b.is_alive(), "a prompt never returned"
    assert torch.equal(got["A"], expected[0]) and torch.equal(got["B"], expected[1])


def test_clearing_the_graphs_waits_for_a_prompt_or_take_in_flight():
    """clear_graphs from another thread while a prompt is in its step, or while generate's take makes its slot's
    decode step: the clear waits for that call to end, so what the call kept is dropped too (without the locks the
    prompt put its bucket back after the clear, and a take that found a slot could fail to remove it)."""
    model = _model(GROUPINGS["none"])
    model.backend = "torch"
    in_call, done = threading.Event(), []

    def step(model, input_ids, valid, cache, rows):
        in_call.set()
        time.sleep(0.3)  # time for the clear to run, were it let in
        return fused.padded_step(model, input_ids, valid, cache, rows)

    def decoder_of(model, cache):
        in_call.set()
        time.sleep(0.3)
        return _eager_decoder_of([])(model, cache)

    prefill, slots = PrefillGraphs(model, step, capture=False), DecodeSlots(decoder_of)
    ids = torch.randint(0, model.args.vocab_size, (1, 9), device=DEVICE)
    for call, kept in ((lambda: prefill(model, ids, None, None, 1), prefill),
                       (lambda: slots.take(model, 1, 20), slots)):
        in_call.clear()
        done.clear()
        with torch.no_grad():
            thread = threading.Thread(target=lambda: done.append(call()), daemon=True)
            thread.start()
            assert in_call.wait(30)
            kept.clear()
            assert done, "the clear returned while the call was in flight"
            thread.join(30)
        assert not thread.is_alive() and len(kept.buckets if kept is prefill else kept.slots) == 0


class _FakeStream:
    """A stream for the CPU tests of StreamOrder: it records what is asked of it."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits for {other.name}")

    def synchronize(self):
        self.log.append(f"host waits for {self.name}")


def test_prompts_from_streams_of_their_own_use_the_shared_buckets_in_turn(monkeypatch):
    """A prompt through the prefill graphs from another stream than the last one's first makes its stream wait for
    that one (the scratch and the buckets' input buffers are shared); once two streams have come, a bucket or
    scratch is freed only after the host has waited for the last stream (chained to every one before). From one
    stream nothing waits."""
    log = []
    streams = {name: _FakeStream(name, log) for name in "ab"}
    on = ["a"]
    monkeypatch.setattr(graphs, "current_stream", lambda device: streams[on[0]])
    model = _model(GROUPINGS["none"])
    step = _stand_in(model.args.vocab_size)  # which stream waits for which: no step needs to run
    prompt = [torch.randint(0, model.args.vocab_size, (1, T), device=DEVICE) for T in (9, 20, 40, 70)]
    with torch.no_grad():
        alone = PrefillGraphs(model, step, capture=False, limit=2)
        for x in prompt:  # a bucket evicted at 40, the scratch made anew at 70
            alone(model, x, None, None, 1)
        alone.clear()
        assert log == []  # one stream: nothing waits, nothing is synchronized
        prefill = PrefillGraphs(model, step, capture=False, limit=2)
        for x in prompt[:2]:
            prefill(model, x, None, None, 1)
        on[0] = "b"
        prefill(model, prompt[0], None, None, 1)
        assert log == ["b waits for a"]
        prefill(model, prompt[1], None, None, 1)
        assert log == ["b waits for a"]  # b again: nothing more
        on[0] = "a"
        log.clear()
        prefill(model, prompt[2], None, None, 1)  # a third bucket past the limit of 2: one goes, after the sync
        assert log == ["a waits for b", "host waits for a"] and len(prefill.buckets) == 2
        log.clear()
        prefill(model, prompt[3], None, None, 1)  # bucket 72 > the scratch's 64 positions: a new scratch
        assert log[0] == "host waits for a" and set(log) == {"host waits for a"}
        log.clear()
        prefill.clear()
        assert log == ["host waits for a"]


def test_a_kept_cache_goes_back_only_to_the_stream_that_used_it(monkeypatch):
    """DecodeSlots: a slot last taken on stream a is not handed to stream b (which gets a cache of its own, made on
    b), so that no stream waits for another's generation and a kept cache is freed after its own stream's work."""
    streams = {name: _FakeStream(name, []) for name in "ab"}
    on = ["a"]
    monkeypatch.setattr(graphs, "current_stream", lambda device: streams[on[0]])
    model = _model(GROUPINGS["none"])
    model.backend = "torch"
    made = []
    slots = DecodeSlots(_eager_decoder_of(made), limit=2)
    first, _ = _taken(slots, model, 1, 20)
    assert first.stream is streams["a"] and _taken(slots, model, 1, 20)[0] is first
    on[0] = "b"
    second, _ = _taken(slots, model, 1, 20)
    assert second is not first and second.stream is streams["b"] and len(made) == 2
    assert _taken(slots, model, 1, 20)[0] is second
    on[0] = "a"
    assert _taken(slots, model, 1, 20)[0] is first


def test_generate_on_kept_caches_equals_new_caches(monkeypatch):
    """Calls of generate one after another on the same kept caches (a long one, then shorter ones, other
    batches, left padding, eos) give what each gives on a cache of its own: nothing of an earlier call's
    keys or bookkeeping reaches a later one."""
    model = _model(GROUPINGS["P2-d1-mlp_input"])
    model.backend = "torch"  # the caches' reuse; the fused step's graphs are the CUDA test's
    g = torch.Generator().manual_seed(9)
    calls = []
    for batch, T, new, pads in ((2, 30, 20, [0, 7]), (2, 9, 6, None), (1, 4, 12, None), (2, 17, 3, [5, 0]),
                                (2, 11, 16, [0, 3])):
        ids = torch.randint(0, model.args.vocab_size, (batch, T), generator=g).to(DEVICE)
        calls.append((ids, new, left_padding_mask(ids, pads) if pads else None))
    expected = [model.generate(ids, new, attention_mask=mask) for ids, new, mask in calls]
    eos = int(expected[0][1, 35])
    expected_eos = model.generate(calls[0][0], 20, attention_mask=calls[0][2], eos_token_id=eos)
    made, used = [], []
    slots = DecodeSlots(_eager_decoder_of(made), limit=2)

    def generation_cache(batch, length):
        used.append(slots.take(model, batch, length)[0])
        return slots.slots[-1]

    monkeypatch.setattr(model, "generation_cache", generation_cache)
    for _ in range(2):
        for (ids, new, mask), want in zip(calls, expected):
            assert torch.equal(model.generate(ids, new, attention_mask=mask), want)
            # the cache's bookkeeping as a new cache's: RoPE is relative, so positions off by a stale count
            # would change no token, only the logits' rounding
            cache, real = used[-1], (mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool))
            valid = torch.cat([real, torch.ones(ids.shape[0], new - 1, dtype=torch.bool, device=DEVICE)], 1)
            assert cache.length == int(cache.position) == valid.shape[1]
            assert torch.equal(cache.n_tokens, valid.sum(1)) and torch.equal(cache.key_valid[:, :cache.length], valid)
            assert not cache.key_valid[:, cache.length:].any()
        assert torch.equal(model.generate(calls[0][0], 20, attention_mask=calls[0][2], eos_token_id=eos),
                           expected_eos)
    assert len(made) == 2 and len(used) == 2 * (len(calls) + 1)  # two caches (batch 2 and 1), kept and reused


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU-only: off CUDA the step runs unpadded")
def test_cpu_forwards_do_not_use_prefill_graphs():
    model = _model(GROUPINGS["none"])
    with torch.no_grad():
        model(torch.zeros(1, 5, dtype=torch.long, device=DEVICE))
    assert model.accelerator.graphs is None


def test_a_bucket_writes_its_mask_and_length_only_when_they_change():
    """_Bucket.load: an unmasked prompt (the usual one) leaves the mask buffer alone while it is all True; a
    masked prompt's mask is copied in, and the next unmasked prompt sees every position real again. The true
    length is written only when it differs from the last prompt's: a prompt of the same length and no mask
    is the ids' one launch, which clamps them to the vocabulary as it copies them (each write is a launch before
    the replay)."""
    model = _model(GROUPINGS["none"])
    entry = graphs._Bucket(model, 2, 16, 1, scratch=model.new_cache(2, 16))
    ids = torch.ones(2, 11, dtype=torch.long, device=DEVICE)
    entry.load(ids, None)
    assert entry.mask.all() and not entry.mask_set and int(entry.count) == 11
    other = ids + 1
    with _ops_logged() as ops:
        entry.load(other, None)
    assert ops == ["aten.clamp.out"] and int(entry.count) == 11 and int(entry.ids[0, 10]) == 2
    valid = left_padding_mask(ids, [0, 4]).bool()
    entry.load(ids, valid)
    assert torch.equal(entry.mask[:, :11], valid) and entry.mask_set and int(entry.count) == 11
    entry.load(ids[:, :5], None)
    assert entry.mask.all() and not entry.mask_set and int(entry.count) == 5
    entry.load(ids, None)
    assert int(entry.count) == 11


@contextlib.contextmanager
def _ops_logged():
    """The aten ops run inside the block, by name (views left out: they launch nothing)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:
                ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Log():
        yield ops


def test_a_held_decode_step_refuses_a_changed_model():
    """A decode step made by model.decoder (a CUDA graph of the step it was made for) refuses to run once the
    model's grouping or packed weights changed, before anything runs (the check needs no GPU)."""
    model = _model(GROUPINGS["P3-d1-residual"])
    for change in (lambda: setattr(model, "cqil", GROUPINGS["none"]), model.pack):
        cache = model.new_cache(1, 8)
        decode = graphs.GraphDecoder(model, cache, lambda *args: pytest.fail("the step ran"))
        change()
        with pytest.raises(ValueError, match="grouping or packed weights changed since this decode step was made"):
            decode(torch.zeros(1, dtype=torch.long, device=DEVICE))
        assert cache.length == 0


def test_a_kept_decode_step_follows_a_new_packing_of_the_same_grouping(monkeypatch):
    """generate's kept decode steps (DecodeSlots: follow_packing) take the model's new packing (a parameter
    replaced by hand, repacked by the prompt's scan) and make their step again, eagerly first; a new grouping
    is still refused, before anything runs. The capture itself is the CUDA test's: here the step runs as it
    would on its first call."""
    model = _model(GROUPINGS["P3-d1-residual"])
    ran = []

    def first_call(self, fn, capture=True):  # what _CapturedLazily does on a first call, without CUDA
        self.calls += 1
        return fn()

    monkeypatch.setattr(graphs._CapturedLazily, "replay_or_run", first_call)
    cache = model.new_cache(1, 8)
    decode = graphs.GraphDecoder(model, cache, lambda *args: ran.append(args) or torch.zeros(1, 1, 3),
                                 follow_packing=True)
    decode.graph, decode.calls = "a graph of the old packing", 5  # as after its capture
    old = decode.packed
    weight = model.layers[2].mlp.down_proj.weight
    weight.data = weight.data * 2
    model.packed_weights()  # the prompt's scan: packed anew
    assert model.packed is not old
    decode(torch.zeros(1, dtype=torch.long, device=DEVICE))
    assert decode.packed is model.packed and decode.graph is None and decode.calls == 1 and len(ran) == 1
    assert cache.length == 1
    model.cqil = GROUPINGS["none"]
    with pytest.raises(ValueError, match="grouping or packed weights changed since this decode step was made"):
        decode(torch.zeros(1, dtype=torch.long, device=DEVICE))
    assert len(ran) == 1 and cache.length == 1


def test_decode_slots_leave_the_bindings_scan_to_the_prompt():
    """DecodeSlots.take checks the model without the scan of the packed weights' bindings: a parameter
    replaced by hand keeps the slot (the prompt's forward scans and repacks next); once repacked, the next
    take drops the slots. A new slot's decode step is made to follow a new packing."""
    model = _model(GROUPINGS["P3-d1-residual"])
    model.backend = "torch"  # the slots' logic
    made = []
    slots = DecodeSlots(_eager_decoder_of(made))
    first, _ = _taken(slots, model, 1, 20)
    packed = model.packed
    weight = model.layers[2].mlp.down_proj.weight
    weight.data = weight.data * 2
    again, _ = _taken(slots, model, 1, 20)
    assert again is first and model.packed is packed and len(made) == 1  # no scan: nothing repacked yet
    model.packed_weights()  # what the prompt's forward does first
    fresh, _ = _taken(slots, model, 1, 20)
    assert fresh is not first and len(made) == 2
    graph_slots = DecodeSlots(lambda model, cache: graphs.GraphDecoder(model, cache, lambda *args: None))
    assert graph_slots.take(model, 1, 20)[1].follow_packing


def test_a_decode_step_refuses_tokens_outside_the_vocabulary():
    """A user's decode step (model.decoder: check_tokens) refuses token ids outside the vocabulary, and a wrong
    number of tokens, with the cache as it was. Tokens on the host are checked before anything runs; tokens on
    the GPU are read once the step is queued, and the step reads them clamped to the vocabulary (the captured
    embedding lookup never indexes out of bounds)."""
    model = _model(GROUPINGS["none"])
    cache = model.new_cache(2, 8)
    seen = []

    def stand_in(tokens, valid, cache):
        seen.append(tokens.clone())
        return torch.zeros(cache.batch, 1, model.args.vocab_size, device=tokens.device)

    decode = graphs.GraphDecoder(model, cache, stand_in)
    for bad, match in ((torch.tensor([3, model.args.vocab_size]), "token id 97, outside the vocabulary"),
                       (torch.tensor([-1, 0]), "token id -1"), (torch.tensor([1, 2, 3]), "a tensor of 2 token ids"),
                       ([1, 2], "a tensor of 2 token ids"), (torch.tensor([1.0, 2.0]), "integer token ids")):
        for device in {"cpu", DEVICE}:
            with pytest.raises((ValueError, TypeError), match=match):
                decode(bad.to(device) if isinstance(bad, torch.Tensor) else bad)
            assert cache.length == 0
    # the GPU's two bad pairs ran, clamped; nothing else did
    assert [t.view(-1).tolist() for t in seen] == ([[3, 96], [0, 0]] if DEVICE == "cuda" else [])


def test_warm_up_checks_its_arguments_and_captures_nothing_off_cuda():
    model = _model(GROUPINGS["P3-d1-residual"])  # max_position_embeddings 128
    for bad, match in (({"batch": 0}, "batch must be an int >= 1"), ({"max_seq": 129}, r"max_seq must be .* 128\]"),
                       ({"max_seq": 1}, "max_seq must be"), ({"max_seq": 40, "prompt_lengths": [5, 40]},
                                                             r"\[1, max_seq - 1 = 39\].*got 40"),
                       ({"prompt_lengths": []}, "got none"), ({"prompt_lengths": [2.0]}, "got 2.0"),
                       ({"prompt_lengths": "12"}, "got '1'")):
        with pytest.raises(ValueError, match=match):
            model.warm_up(**bad)
    backend = fused.TritonBackend(prefill_graph_limit=2)
    with pytest.raises(ValueError, match="at most 4096"):
        backend.warm_up(model, 1, 5000, [4097])
    with pytest.raises(ValueError, match="fall in 3 buckets, more than the 2 kept"):
        backend.warm_up(model, 1, 100, [5, 20, 40])
    if DEVICE == "cpu":  # nothing is captured off CUDA, nor with the torch backend
        assert model.warm_up(2, 40) == [] and backend.warm_up(model, 1, 100, [5, 20]) == []
    model.backend = "torch"
    assert model.warm_up(2, 40) == []


# ------------------------------------------------------------------------------------------------------
# CUDA: the captured graphs


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("keep", [0, 1])
def test_cuda_prefill_graph_replays_equal_the_eager_padded_step(keep):
    """The first call of a bucket runs eagerly, the second captures, the third replays: bit for bit the
    same logits and cache; against the unpadded eager path (prefill_graphs off) equal within bf16
    rounding, and greedy generation gives the same tokens."""
    model = _model(GROUPINGS["P3-d1-residual"], torch.bfloat16)
    ids = torch.randint(0, model.args.vocab_size, (2, 21), device="cuda")
    mask = left_padding_mask(ids, [0, 6])
    outs, caches = [], []
    with torch.no_grad():
        for _ in range(4):
            cache = model.new_cache(2, 30)
            outs.append(model(ids, mask, cache=cache, logits_to_keep=keep))
            caches.append(cache)
        graphs_of_model = model.accelerator.graphs
        assert graphs_of_model.captured() == 1 and list(graphs_of_model.buckets) == [(2, 32, keep, None)]
        for out, cache in zip(outs[1:], caches[1:]):
            torch.testing.assert_close(out, outs[0], rtol=0, atol=0)
            assert torch.equal(cache.runs[0][0][..., :21, :], caches[0].runs[0][0][..., :21, :])
            assert torch.equal(cache.key_valid, caches[0].key_valid) and int(cache.position) == 21
        model.accelerator.prefill_graphs = False
        cache = model.new_cache(2, 30)
        eager = model(ids, mask, cache=cache, logits_to_keep=keep)
        torch.testing.assert_close(outs[0].float(), eager.float(), rtol=2e-2, atol=2e-2)
        assert graphs_of_model.captured() == 1  # the switch: nothing new
        model.to(torch.float32)  # moved weights drop the graphs; fp32 keeps greedy ties out of the comparison
        tokens_eager = model.generate(ids, 12, attention_mask=mask)
        model.accelerator.prefill_graphs = True
        for _ in range(3):  # eager padded, captured, replayed
            assert torch.equal(model.generate(ids, 12, attention_mask=mask), tokens_eager)
        (kept, _), = model.accelerator.slots.slots  # generate's prompt runs straight in its kept cache
        assert graphs_of_model.captured() == 1 and list(graphs_of_model.buckets) == [(2, 32, 1, id(kept))]


@cuda
@pytest.mark.cuda
def test_cuda_prefill_graphs_serve_chunks_and_turns_after_a_prefix(monkeypatch):
    # fp32: the chunked and whole prompts' tokens compared exactly; 256 positions: prompts of 14 buckets
    model = _model(GROUPINGS["none"], max_position_embeddings=256)
    ids = torch.randint(0, model.args.vocab_size, (1, 40), device="cuda")
    with torch.no_grad():
        expected = model.generate(ids, 8, prefill_chunk=None)
        monkeypatch.setattr(graphs, "MAX_BUCKET", 16)
        # 40 tokens in parts of 16, each (16 into the empty cache, 16 after 16, 8 after 32) through a bucket of
        # 16 bound to generate's cache of 48 positions (kept from call to call, graphs.DecodeSlots): eager,
        # then captured, then replayed; the whole prompt of the first call went through the 48 bucket bound
        # to the same cache (run once: eager). No scratch bucket: nothing copied over.
        for _ in range(3):
            assert torch.equal(model.generate(ids, 8, prefill_chunk=16), expected)
        held = model.accelerator.graphs.buckets
        (kept, _), = model.accelerator.slots.slots
        assert list(held) == [(1, 48, 1, id(kept)), (1, 16, 1, id(kept))]
        entry = held[(1, 16, 1, id(kept))]
        assert entry.calls == 9 and entry.graph is not None and entry.target() is kept and entry.scratch is None
        assert model.accelerator.graphs.captured() == 1
        monkeypatch.setattr(graphs, "MAX_BUCKET", 4096)
        ids = torch.randint(0, model.args.vocab_size, (1, 160), device="cuda")
        lengths = [16, 32, 48, 64, 72, 80, 88, 96, 104, 112, 120, 128, 144, 160]  # 14 buckets
        model.accelerator.prefill_graph_limit = 8
        # the longest first: its scratch (256 positions) holds every bucket's, so none is dropped for a longer
        # scratch (test_the_buckets_of_a_batch_size_share_one_scratch) and only the bound evicts
        for T in lengths[-1:] + lengths:
            model(ids[:, :T], logits_to_keep=1)
        assert list(model.accelerator.graphs.buckets) == [(1, T, 1, None) for T in lengths[-8:]]
        assert [scratch.max_seq for scratch in model.accelerator.graphs.scratches.values()] == [256]
        model.accelerator.prefill_graph_limit = MAX_GRAPHS
        # a conversation's turns into one cache: the first through a scratch bucket, the next three through
        # the 32 bucket bound to the cache (eager, captured, replayed), as the eager path computes them
        turns = [torch.randint(0, model.args.vocab_size, (2, T), device="cuda") for T in (20, 25, 30, 28)]
        caches, outs = [], []
        for graphs_on in (True, False):
            model.accelerator.prefill_graphs = graphs_on
            cache = model.new_cache(2, 160)
            outs.append([model(t, cache=cache, logits_to_keep=1) for t in turns])
            caches.append(cache)
        for got, want in zip(*outs):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert int(caches[0].position) == int(caches[1].position) == 103
        assert torch.equal(caches[0].key_valid, caches[1].key_valid)
        for graph_kv, eager_kv in zip(caches[0].runs[0], caches[1].runs[0]):  # past 103: the padding's slots
            torch.testing.assert_close(graph_kv[..., :103, :], eager_kv[..., :103, :], rtol=1e-4, atol=1e-4)
        model.accelerator.prefill_graphs = True
        entry = model.accelerator.graphs.buckets[(2, 32, 1, id(caches[0]))]
        assert entry.calls == 3 and entry.graph is not None


@cuda
@pytest.mark.cuda
def test_cuda_bad_prompts_raise_once_their_replay_is_queued_and_leave_every_cache_as_it_was():
    """On CUDA a prompt's values are read once its step is queued (generation.InputCheck): model(...) into a new
    cache and after a prefix, and generate (its kept cache), with an id outside the vocabulary or a right-padded
    mask, raise check_inputs' ValueError on the bucket's eager run, its capture and its replays; the next calls
    give what a model that never saw the bad prompts gives, bit for bit."""
    model, twin = _model(GROUPINGS["P3-d1-residual"]), _model(GROUPINGS["P3-d1-residual"])
    V = model.args.vocab_size
    ids = torch.randint(0, V, (2, 9), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    bad = ids.clone()
    bad[1, 4] = V
    right_padded = torch.ones_like(ids)
    right_padded[0, -1] = 0
    with torch.no_grad():
        kept, kept_twin = model.new_cache(2, 64), twin.new_cache(2, 64)
        model(ids, cache=kept), twin(ids, cache=kept_twin)
        for _ in range(3):  # the buckets' eager run, capture, replay
            with pytest.raises(ValueError, match=f"token id {V}, outside the vocabulary"):
                model(bad, cache=model.new_cache(2, 40))
            with pytest.raises(ValueError, match=f"token id {V}, outside the vocabulary"):
                model(bad, cache=kept)
            with pytest.raises(ValueError, match="must be left-padded"):
                model(ids, right_padded, cache=kept)
            with pytest.raises(ValueError, match=f"token id {V}, outside the vocabulary"):
                model.generate(bad, 3)
            assert kept.length == 9
        assert torch.equal(model(ids, cache=kept), twin(ids, cache=kept_twin))
        assert torch.equal(model(ids, cache=model.new_cache(2, 40)), twin(ids, cache=twin.new_cache(2, 40)))
        assert torch.equal(model.generate(ids, 5), twin.generate(ids, 5))


@cuda
@pytest.mark.cuda
def test_cuda_generate_replays_its_decode_graph_across_calls():
    """generate's cache and decode graph are kept: the first call runs its first decode step eagerly and
    captures the second, later calls (a shorter one on the same cache) replay from their first step, with
    the tokens of the path without graphs (fp32)."""
    model = _model(GROUPINGS["P3-d1-residual"])
    ids = torch.randint(0, model.args.vocab_size, (2, 21), device="cuda")
    model.accelerator.cuda_graphs = False
    expected = [model.generate(ids, 10), model.generate(ids[:, :7], 12)]
    model.accelerator.cuda_graphs = True
    for _ in range(3):
        assert torch.equal(model.generate(ids, 10), expected[0])
        assert torch.equal(model.generate(ids[:, :7], 12), expected[1])
    (cache, decode), = model.accelerator.slots.slots  # 31 and 19 positions: one cache of bucket(31) = 32
    assert cache.max_seq == 32 and decode.graph is not None and decode.calls == 3 * (9 + 11)
    model.accelerator.clear_graphs()
    assert not model.accelerator.slots.slots and not model.accelerator.graphs.buckets
    assert torch.equal(model.generate(ids, 10), expected[0])


@cuda
@pytest.mark.cuda
def test_cuda_captures_leave_other_threads_alone():
    """A serving thread reads tensors to the host and pins memory while this one captures prompt buckets and decode
    steps: neither thread fails. The captures are thread-local (ops/_common.CAPTURE_MODE); under torch's default
    mode the other thread's calls raise "operation not permitted when stream is capturing", and the capture with
    them."""
    model = _model(GROUPINGS["P3-d1-residual"], torch.bfloat16)
    ids = torch.randint(0, model.args.vocab_size, (2, 70), device="cuda")
    stop, errors, rounds = threading.Event(), [], [0]

    def serve():
        x = torch.ones(1000, device="cuda")
        try:
            while not stop.is_set():
                assert x.sum().item() == 1000  # a launch, then a read of the device
                torch.ones(1 << 14).pin_memory()  # the host allocator queries its blocks' events
                rounds[0] += 1
        except BaseException as e:  # noqa: B902 (reported by the main thread)
            errors.append(e)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        captured = 0
        for T in (5, 9, 17, 33, 65, 70):  # each bucket anew (cleared below): eager, captured, replayed; decode too
            for _ in range(3):
                model(ids[:, :T], logits_to_keep=1)
            model.generate(ids[:, :T], 4)
            captured = max(captured, model.accelerator.graphs.captured())
            model.accelerator.clear_graphs()
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors, f"the serving thread failed: {errors[0]!r}"
    assert not thread.is_alive() and rounds[0] > 0 and captured >= 1


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("streams", [False, True], ids=["default-stream", "own-streams"])
def test_cuda_threads_generating_at_once_get_the_tokens_of_one_thread_alone(streams):
    """Four threads call generate and model(ids) on one model at once, prompts of one bucket among them (fp32:
    greedy tokens compared exactly), on the default stream or each on a stream of its own: each gets what it gets
    alone."""
    model = _model(GROUPINGS["P3-d1-residual"])
    prompts = [torch.randint(0, model.args.vocab_size, (2, T), device="cuda") for T in (11, 14, 21, 30)]
    with torch.no_grad():
        expected = [(model.generate(x, 9), model(x, logits_to_keep=1)) for x in prompts]
    model.accelerator.clear_graphs()
    torch.cuda.synchronize()  # the prompts and expectations, made on the default stream, are there for every stream
    got, errors = {}, []

    def run(i):
        try:
            with torch.no_grad(), torch.cuda.stream(torch.cuda.Stream() if streams else torch.cuda.current_stream()):
                for _ in range(4):  # eager, captured, replayed, replayed
                    got[i] = (model.generate(prompts[i], 9), model(prompts[i], logits_to_keep=1))
                    assert torch.equal(got[i][0], expected[i][0])
                    torch.testing.assert_close(got[i][1], expected[i][1], rtol=1e-4, atol=1e-4)
        except BaseException as e:  # noqa: B902 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, repr(errors[0])
    assert len(got) == len(prompts) and not any(thread.is_alive() for thread in threads)


@pytest.mark.parametrize("dtype, head_dim, word", [(torch.bfloat16, 16, torch.int64), (torch.bfloat16, 6, torch.int32),
                                                    (torch.float16, 2, torch.int32), (torch.float32, 2, torch.int64)])
def test_copy_prompt_moves_the_bits_as_the_widest_words_a_row_allows(dtype, head_dim, word):
    """copy_prompt copies each head's row as integer words (model._as_words: the widest that tile it); every
    bit lands where a plain copy puts it — NaN payloads included — in a longer cache of several runs of
    heads (a hybrid rank's layout), for a prompt shorter than the source."""
    from cqil_kernels.config import LlamaArgs
    from cqil_kernels.model import KVCache, _as_words

    args = LlamaArgs(vocab_size=11, hidden_size=4 * head_dim, intermediate_size=32, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=64)
    stages, heads = [(0,), (1, 2), (3,)], [2, 1, 2]
    src = KVCache(args, stages, 2, 20, torch.device(DEVICE), dtype, kv_heads=heads)
    bits = src._kv.view(torch.int16)
    bits.copy_(torch.randint(-2 ** 15, 2 ** 15, bits.shape, dtype=torch.int16))  # any bits, NaNs among them
    src.key_valid[:, :13] = True
    dst = KVCache(args, stages, 2, 33, torch.device(DEVICE), dtype, kv_heads=heads)
    dst._kv.view(torch.int16).fill_(7)
    dst.copy_prompt(src, 13)
    assert len(dst._run_kv) == 3 and all(_as_words(kv[..., :13, :]).dtype == word for kv in dst._run_kv)
    for got, want in zip(dst._run_kv, src._run_kv):
        assert torch.equal(got[..., :13, :].view(torch.int16), want[..., :13, :].view(torch.int16))
        assert (got[..., 13:, :].view(torch.int16) == 7).all()  # the rest left alone


def test_cache_runs_of_equal_heads_are_handed_over():
    """A rank's cache: stages of other head counts (shards, whole layers) and stages it does not hold (no
    heads) — copy_prompt copies each run of equal heads and leaves positions past `length` alone."""
    from cqil_kernels.model import KVCache

    args = _model(GROUPINGS["none"]).args
    stages, heads = [(0,), (1, 2), (3,), (4,), (5,)], [1, 0, 2, 2, 1]
    src = KVCache(args, stages, 2, 8, torch.device(DEVICE), torch.float32, kv_heads=heads)
    dst = KVCache(args, stages, 2, 12, torch.device(DEVICE), torch.float32, kv_heads=heads)
    assert [tuple(k.shape) for k, _ in src.runs] == [(1, 2, 1, 8, 8), (2, 2, 2, 8, 8), (1, 2, 1, 8, 8)]
    for k, v in src.runs:
        k.normal_()
        v.normal_()
    src.key_valid[:, :5] = True
    src.n_tokens.fill_(5)
    for t in (*dst.k, *dst.v):
        t.fill_(-1.0)
    dst.copy_prompt(src, 5)
    for s, stage in enumerate(stages):
        assert torch.equal(dst.k[s][..., :5, :], src.k[s][..., :5, :])
        assert torch.equal(dst.v[s][..., :5, :], src.v[s][..., :5, :])
        assert (dst.k[s][..., 5:, :] == -1).all() and (dst.v[s][..., 5:, :] == -1).all()  # the rest left alone
    assert int(dst.position) == 5 and dst.n_tokens.tolist() == [5, 5]
    with pytest.raises(ValueError, match="same stages, batch, heads"):
        dst.copy_prompt(KVCache(args, stages, 2, 8, torch.device(DEVICE), torch.float32, kv_heads=[1, 0, 2, 2, 2]), 5)


@cuda
@pytest.mark.cuda
def test_cuda_warm_up_captures_what_generate_then_replays():
    """After warm_up(batch, max_seq) every prompt bucket up to max_seq - 1 and the kept cache's decode step
    are captured (the cache holds bucket(40) = 48 positions, so every bucket binds to it): generate's calls of
    any of those lengths replay from their first forward, with the tokens of the path without graphs."""
    model = _model(GROUPINGS["P3-d1-residual"])
    g = torch.Generator(device="cuda").manual_seed(3)
    calls = [(torch.randint(0, model.args.vocab_size, (2, T), device="cuda", generator=g), new)
             for T, new in ((5, 3), (20, 19), (33, 6), (39, 1))]
    model.accelerator.cuda_graphs = False
    expected = [model.generate(ids, new) for ids, new in calls]
    model.accelerator.cuda_graphs = True
    assert model.warm_up(2, 40) == [16, 32, 48]
    (cache, decode), = model.accelerator.slots.slots
    buckets = model.accelerator.graphs.buckets
    assert decode.graph is not None and decode.calls == 2 and cache.max_seq == 48
    assert list(buckets) == [(2, 16, 1, id(cache)), (2, 32, 1, id(cache)), (2, 48, 1, id(cache))]
    assert all(entry.graph is not None and entry.calls == 2 for entry in buckets.values())
    for (ids, new), want in zip(calls, expected):
        assert torch.equal(model.generate(ids, new), want)
    assert [entry.calls for entry in buckets.values()] == [3, 3, 4]  # (16: 5), (32: 20), (48: 33 and 39)
    assert model.accelerator.slots.slots[0][0] is cache
