"""The Triton backend (fused.py) against the torch backend, model level (CPU: TRITON_INTERPRET=1)."""

import pytest
import torch

from cqil_kernels import CQILConfig, CQILLlama

from conftest import left_padding_mask, random_hf_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GROUPINGS = {
    "none": CQILConfig(),
    "pairs-d0": CQILConfig(groups=((1, 2), (3, 4))),
    "P3-d1-residual": CQILConfig(groups=((1, 2, 3),), bypass=1),
    "P4-d2-mlp_input": CQILConfig(groups=((2, 3, 4, 5),), bypass=2, bypass_mode="mlp_input"),
}


def _models(cqil, **overrides):
    hf = random_hf_model(seed=11, **overrides)
    model = CQILLlama.from_pretrained(hf, cqil=cqil, device=DEVICE, dtype=torch.float32)
    return model


@pytest.mark.parametrize("name", GROUPINGS)
def test_triton_backend_matches_torch_backend(name):
    model = _models(GROUPINGS[name])
    ids = torch.randint(0, model.args.vocab_size, (3, 13), device=DEVICE)
    mask = left_padding_mask(ids, [0, 4, 11])
    with torch.no_grad():
        model.backend = "torch"
        expected = model(ids, mask)
        model.backend = "triton"
        got = model(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("name", ["none", "P3-d1-residual"])
def test_cached_prefill_then_decode_matches_torch_backend(name):
    model = _models(GROUPINGS[name], head_dim=16, attention_bias=True, mlp_bias=True)
    ids = torch.randint(0, model.args.vocab_size, (2, 9), device=DEVICE)
    mask = left_padding_mask(ids, [3, 0])
    logits = {}
    with torch.no_grad():
        for backend in ("torch", "triton"):
            model.backend = backend
            cache = model.new_cache(2, 16)
            steps = [model(ids, mask, cache=cache)[:, -1]]
            for t in range(4):
                steps.append(model(ids[:, t:t + 1], cache=cache)[:, -1])
            logits[backend] = torch.stack(steps)
            assert cache.length == 13 and int(cache.position) == 13
    torch.testing.assert_close(logits["triton"], logits["torch"], atol=2e-4, rtol=2e-4)


def test_generate_is_identical_on_both_backends():
    model = _models(GROUPINGS["pairs-d0"])
    ids = torch.randint(0, model.args.vocab_size, (2, 7), device=DEVICE)
    mask = left_padding_mask(ids, [2, 0])
    model.backend = "torch"
    expected = model.generate(ids, 8, attention_mask=mask)
    model.backend = "triton"
    torch.testing.assert_close(model.generate(ids, 8, attention_mask=mask), expected, rtol=0, atol=0)


def test_regrouping_reuses_the_packed_weights():
    model = _models(GROUPINGS["none"])
    model.backend = "triton"
    ids = torch.randint(0, model.args.vocab_size, (1, 5), device=DEVICE)
    with torch.no_grad():
        model(ids)
        packed = model.packed_layers
        model.cqil = GROUPINGS["pairs-d0"]
        got = model(ids)
        assert model.packed_layers is packed  # a group is a slice of the layer-major tensors
        model.backend = "torch"
        torch.testing.assert_close(got, model(ids), atol=2e-4, rtol=2e-4)


def test_replaced_parameters_are_repacked():
    model = _models(GROUPINGS["pairs-d0"])
    model.backend = "triton"
    ids = torch.randint(0, model.args.vocab_size, (1, 5), device=DEVICE)
    with torch.no_grad():
        before = model(ids)
        layer = model.layers[2].mlp.down_proj
        layer.weight = torch.nn.Parameter(layer.weight * 2, requires_grad=False)
        assert not model.packed_layers.is_current()
        after = model(ids)
        assert model.packed_layers.is_current()
        assert not torch.allclose(before, after)
        model.backend = "torch"
        torch.testing.assert_close(after, model(ids), atol=2e-4, rtol=2e-4)


def test_backend_choice_is_checked():
    model = _models(GROUPINGS["none"])
    with pytest.raises(ValueError, match="backend must be one of"):
        model.backend = "cuda"
    model.backend = "triton"
    model.double()
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        model(torch.zeros(1, 3, dtype=torch.long, device=DEVICE))
    model.backend = "auto"
    assert not model.uses_triton()  # float64 falls back to the torch backend


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU-only: Triton on CPU tensors needs the interpreter")
def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    model = _models(GROUPINGS["none"])
    assert model.backend == "auto" and not model.uses_triton()  # auto stays on torch on the CPU
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model.backend = "triton"
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        model(torch.zeros(1, 3, dtype=torch.long))
