"""cqil_kernels: CQIL (Concurrent Computation of Quasi-Independent Layers) inference for LLaMA models."""

__version__ = "0.1.0"

from .config import CQILConfig, LlamaArgs
from .model import CQILLlama, KVCache

__all__ = ["CQILConfig", "CQILLlama", "KVCache", "LlamaArgs", "__version__"]
