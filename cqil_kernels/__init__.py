"""cqil_kernels: CQIL (Concurrent Computation of Quasi-Independent Layers) inference for LLaMA models."""

__version__ = "0.1.0"

from .config import CQILConfig, LlamaArgs
from .llama import CQILLlama
from .model import CQILTransformer, KVCache

__all__ = ["CQILConfig", "CQILLlama", "CQILTransformer", "KVCache", "LlamaArgs", "__version__"]
