"""Shared fixtures: tiny random LLaMA models built with transformers (the reference implementation)."""

from __future__ import annotations

import pytest
import torch

TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=83, num_hidden_layers=6,
            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128)


def random_hf_model(seed: int = 0, scale: float = 0.15, **overrides):
    """A transformers LlamaForCausalLM with O(1) activations.

    transformers initialises weights with std 0.02, which makes every layer nearly the identity; larger
    weights and non-trivial norm scales make a wrong grouping, bypass or mask visible in the logits.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY, **overrides})
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(scale * torch.randn_like(p))
    return model


@pytest.fixture
def hf_tiny():
    return random_hf_model()



def left_padding_mask(ids: torch.Tensor, pads: list[int]) -> torch.Tensor:
    """An attention mask like ids, 0 over the first pads[row] positions of each row and 1 elsewhere."""
    positions = torch.arange(ids.shape[1], device=ids.device)
    return (positions[None, :] >= torch.tensor(pads, device=ids.device)[:, None]).to(ids.dtype)
