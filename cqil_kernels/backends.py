"""Which faster backend a model gets: the fused Triton one (fused.py) where Triton is installed."""

from __future__ import annotations


def attach_default(model):
    """Attach the fused Triton backend to `model` (a model.CQILTransformer) when Triton is installed;
    without it (a CPU-only torch install) the model keeps its torch backend. Returns the model."""
    try:
        from . import fused
    except ImportError:
        return model
    fused.attach(model)
    return model
