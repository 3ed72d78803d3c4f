"""quality.py on tiny random models, against transformers' own hidden states and loss."""

import math
import types

import pytest
import torch

from cqil_kernels import CQILConfig, CQILLlama
from cqil_kernels.quality import ReferenceRun, layer_input_similarity

from conftest import random_hf_model


@pytest.fixture(scope="module")
def pair():
    hf = random_hf_model(seed=21)
    return hf, CQILLlama.from_pretrained(hf, cqil=CQILConfig(groups=((1, 2),)), device="cpu")


def test_similarity_matches_transformers_hidden_states(pair):
    hf, model = pair
    ids = torch.randint(0, 97, (50,), generator=torch.Generator().manual_seed(0))
    sim = layer_input_similarity(model, ids, window=20)
    with torch.no_grad():
        states = []
        for begin in range(0, 50, 20):  # the same windows
            out = hf(ids[None, begin:begin + 20], output_hidden_states=True)
            states.append(torch.stack(out.hidden_states[:-1])[:, 0])  # inputs of layers 0..L-1
    x = torch.nn.functional.normalize(torch.cat(states, 1).double(), dim=-1)
    expected = torch.einsum("ind,jnd->ij", x, x) / 50
    torch.testing.assert_close(sim.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sim, sim.T)
    torch.testing.assert_close(sim.diagonal(), torch.ones(6), atol=1e-5, rtol=0)
    assert model.cqil.groups == ((1, 2),)  # the model's grouping is left as it was
    model.backend = "triton"  # the fused backend never calls the layer modules the pass hooks
    try:
        torch.testing.assert_close(layer_input_similarity(model, ids, window=20), sim, rtol=0, atol=0)
        assert model.backend == "triton"
    finally:
        model.backend = "auto"


@pytest.mark.parametrize("window,stride", [(16, 16), (16, 8), (37, 37)])
def test_perplexity_matches_transformers_loss(pair, window, stride):
    hf, model = pair
    ids = torch.randint(0, 97, (37,), generator=torch.Generator().manual_seed(1))
    ref = ReferenceRun(model, ids, window=window, stride=stride)
    nll_sum, n, prev_end = 0.0, 0, 1
    with torch.no_grad():  # the sliding-window recipe of transformers' perplexity guide
        for begin in range(0, 37, stride):
            end = min(begin + window, 37)
            if end > prev_end:
                labels = ids[None, begin:end].clone()
                labels[0, :max(prev_end, begin + 1) - begin] = -100
                scored = int((labels[0, 1:] != -100).sum())
                nll_sum += hf(ids[None, begin:end], labels=labels).loss.item() * scored
                n += scored
                prev_end = end
            if end == 37:
                break
    assert ref.baseline.tokens == n == (34 if stride == window == 16 else 36)  # each at most once
    assert math.isclose(ref.baseline.perplexity, math.exp(nll_sum / n), rel_tol=1e-5)
    same = ref.evaluate(CQILConfig())
    assert same.agreement == 1.0 and same.kl == 0.0 and same.perplexity == ref.baseline.perplexity


def test_windows_scored_together_equal_one_at_a_time(pair, monkeypatch):
    """ReferenceRun batches windows of one length into one forward (BATCH_BYTES of logits at most): the
    same log-probabilities as one window per forward, and fewer calls."""
    _, model = pair
    ids = torch.randint(0, 97, (101,), generator=torch.Generator().manual_seed(4))
    calls = []
    forward = type(model).forward
    monkeypatch.setattr(type(model), "forward",
                        lambda self, x, *a, **k: calls.append(x.shape) or forward(self, x, *a, **k))
    together = ReferenceRun(model, ids, window=16, stride=10)  # 9 windows of 16, the last of 11
    assert calls == [(9, 16), (1, 11)]
    calls.clear()
    grouped = together.evaluate(CQILConfig(groups=((1, 2),)))
    assert calls == [(9, 16), (1, 11)] and grouped.windows == 10
    calls.clear()
    monkeypatch.setattr(ReferenceRun, "BATCH_BYTES", 16 * 97 * 4 * 4)  # 4 windows of 16 per call
    apart = ReferenceRun(model, ids, window=16, stride=10)
    assert calls == [(4, 16), (4, 16), (1, 16), (1, 11)]
    for a, b in zip(together.logprobs, apart.logprobs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_grouping_costs_quality(pair):
    _, model = pair
    ref = ReferenceRun(model, torch.randint(0, 97, (60,), generator=torch.Generator().manual_seed(2)), window=30)
    grouped = ref.evaluate(CQILConfig(groups=((1, 2, 3, 4),)))
    assert grouped.kl > 0 and grouped.agreement < 1.0 and grouped.perplexity != ref.baseline.perplexity


def test_reference_log_probs_stay_on_the_gpu_when_they_take_a_quarter_of_its_free_memory(monkeypatch, pair):
    """ReferenceRun.store_device (the free memory faked): the model's GPU up to a quarter of its free memory,
    beyond it the CPU; a CPU model keeps them on the CPU. Evaluations are the same whichever holds them."""
    _, model = pair
    gpu = types.SimpleNamespace(device=torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (4000, 10**6))
    assert ReferenceRun.store_device(gpu, 1000) == torch.device("cuda", 0)
    assert ReferenceRun.store_device(gpu, 1001) == torch.device("cpu")
    assert ReferenceRun.store_device(model, 1) == torch.device("cpu")
    ids = torch.randint(0, 97, (70,), generator=torch.Generator().manual_seed(4))
    grouping = CQILConfig(groups=((1, 2),))
    ref = ReferenceRun(model, ids, window=20, stride=15)  # 4 windows of 20, then one of 10 (scored apart)
    assert all(lp.device == torch.device("cpu") for lp in ref.logprobs)
    monkeypatch.setattr(ReferenceRun, "store_device", lambda *a: pytest.fail("asked where to keep them"))
    assert ReferenceRun(model, ids, window=20, store="cpu").logprobs[0].device == torch.device("cpu")
    # windows scored as they stream out, in window order: each window's NLL as one forward of it computes it
    nll = ref.grouped_window_nll(grouping)
    with torch.no_grad(), model.grouping(grouping):
        for (begin, end, first), got in zip(ref.spans, nll.tolist()):
            lp = model(ids[None, begin:end])[0, first - 1 - begin:end - 1 - begin].float().log_softmax(-1)
            assert got == pytest.approx(-lp.gather(-1, ids[first:end, None]).double().sum().item(), rel=1e-6)
    metrics = ref.evaluate(grouping)
    assert nll.dtype == torch.float64 and metrics.perplexity == math.exp(nll.sum().item() / metrics.tokens)


def test_bad_input_is_refused(pair):
    _, model = pair
    with pytest.raises(ValueError, match="at least 2"):
        ReferenceRun(model, torch.tensor([5]))
    with pytest.raises(ValueError, match="fewer than one window of 64"):
        ReferenceRun(model, torch.arange(40), window=64)
    with pytest.raises(ValueError, match="another model's tokenizer"):
        layer_input_similarity(model, torch.tensor([1, 2, 500]))
    with pytest.raises(TypeError, match="integer tensor"):
        layer_input_similarity(model, torch.rand(10))
    with pytest.raises(ValueError, match="stride"):
        ReferenceRun(model, torch.arange(10), window=8, stride=9)
    with pytest.MonkeyPatch.context() as mp:  # a text whose reference log-probs would not fit
        mp.setattr(ReferenceRun, "MAX_BYTES", 97 * 4 * 30)
        with pytest.raises(ValueError, match="at most 30 tokens"):
            ReferenceRun(model, torch.arange(40) % 97, window=8)
        ReferenceRun(model, torch.arange(31) % 97, window=8)  # 30 scored tokens fit


def _planted_model():
    """Layers 2, 3 and 4 barely touch the residual stream, so the inputs of layers 2..5 are nearly equal."""
    hf = random_hf_model(seed=22)
    with torch.no_grad():
        for l in (2, 3, 4):
            hf.model.layers[l].self_attn.o_proj.weight.mul_(1e-3)
            hf.model.layers[l].mlp.down_proj.weight.mul_(1e-3)
    return CQILLlama.from_pretrained(hf, device="cpu")


def test_search_finds_the_planted_range():
    from cqil_kernels.quality import find_quasi_independent_layers

    model = _planted_model()
    calib = torch.randint(0, 97, (96,), generator=torch.Generator().manual_seed(3))
    held_out = torch.randint(0, 97, (192,), generator=torch.Generator().manual_seed(4))
    result = find_quasi_independent_layers(model, calib, held_out, parallel=(2, 3, 4), max_ppl_increase=0.01,
                                           window=24)
    layers = {l for g in result.config.groups for l in g}
    assert layers and layers <= {2, 3, 4, 5}, result.config
    assert result.layers_saved >= 2
    assert result.chosen.ppl_increase_ci[1] <= 0.01 and result.chosen.windows == 8
    for row in result.candidates:  # the budget holds for the interval's upper end, not the point estimate
        low, high = row["ppl_increase_ci_pct"]
        assert low <= row["ppl_increase_pct"] + 1e-6 and row["within_budget"] == (high <= 1.0)
    assert result.similarity[2:6, 2:6].min() > 0.99 and result.similarity[0, 1] < 0.99
    again = find_quasi_independent_layers(model, calib, held_out, parallel=(2, 3, 4), max_ppl_increase=0.01,
                                          window=24)
    assert again.config == result.config and again.candidates == result.candidates  # deterministic for a seed


def test_search_never_exceeds_the_budget():
    from cqil_kernels.quality import find_quasi_independent_layers

    model = CQILLlama.from_pretrained(random_hf_model(seed=23), device="cpu")
    ids = torch.randint(0, 97, (128,), generator=torch.Generator().manual_seed(5))
    result = find_quasi_independent_layers(model, ids, parallel=2, max_ppl_increase=1e-6, window=16)
    assert result.chosen.perplexity <= result.baseline.perplexity * (1 + 1e-6)
    assert not any(row["within_budget"] for row in result.candidates) or result.config.groups


def test_search_refuses_bad_arguments():
    from cqil_kernels.quality import find_quasi_independent_layers

    model = CQILLlama.from_pretrained(random_hf_model(seed=23), device="cpu")
    ids = torch.arange(40)
    with pytest.raises(ValueError, match="max_ppl_increase must be > 0"):
        find_quasi_independent_layers(model, ids, max_ppl_increase=0)
    with pytest.raises(ValueError, match="exceeds the model's 6 layers"):
        find_quasi_independent_layers(model, ids, parallel=7)
    with pytest.raises(ValueError, match=r"gives 3 window\(s\) of 16 tokens; .* at least 8: 128 tokens \(it has 40\)"):
        find_quasi_independent_layers(model, ids, window=16)
    with pytest.raises(ValueError, match="parallel must be"):
        find_quasi_independent_layers(model, ids, parallel=1)
    with pytest.raises(ValueError, match="at least 2"):
        find_quasi_independent_layers(model, torch.tensor([3]))
    with pytest.raises(ValueError, match="bypass"):
        find_quasi_independent_layers(model, ids, bypass=-1)


def test_paired_bootstrap_interval():
    """The interval holds the point estimate, is the same for a seed, narrows with more windows, and is
    far narrower paired (windows that are hard for the original are hard for the grouping too) than the
    spread of the windows' own perplexities."""
    from cqil_kernels.quality import paired_bootstrap

    g = torch.Generator().manual_seed(0)
    tokens = torch.full((64,), 100.0)
    difficulty = 300 * torch.rand(64, generator=g, dtype=torch.float64)  # per-window nll sums vary a lot
    base = difficulty
    new = difficulty + 5 + torch.randn(64, generator=g, dtype=torch.float64)  # +5 nats per window, +-1
    point = math.exp((new - base).sum().item() / tokens.sum().item()) - 1
    low, high = paired_bootstrap(base, new, tokens, seed=1)
    assert low <= point <= high and (low, high) == paired_bootstrap(base, new, tokens, seed=1)
    assert high - low < 0.01  # the pairing removes the windows' difficulty
    few = paired_bootstrap(base[:8], new[:8], tokens[:8], seed=1)
    assert few[1] - few[0] > high - low
    kl_low, kl_high = paired_bootstrap(base, new, tokens, ratio=False, seed=1)
    assert kl_low <= new.sum().item() / tokens.sum().item() <= kl_high


def test_metrics_carry_the_intervals(pair):
    _, model = pair
    ref = ReferenceRun(model, torch.randint(0, 97, (160,), generator=torch.Generator().manual_seed(6)), window=20)
    grouped = ref.evaluate(CQILConfig(groups=((1, 2, 3, 4),)))
    assert ref.baseline.windows == grouped.windows == 8 and ref.baseline.ppl_increase_ci is None
    low, high = grouped.ppl_increase_ci
    assert low <= grouped.perplexity / ref.baseline.perplexity - 1 <= high
    assert grouped.kl_ci[0] <= grouped.kl <= grouped.kl_ci[1]
    row = grouped.row()
    assert row["windows"] == 8 and len(row["ppl_increase_ci_pct"]) == 2 and len(row["kl_ci"]) == 2
