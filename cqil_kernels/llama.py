"""CQILLlama: the model users load. The readable spec (model.CQILTransformer) plus loading checkpoints
(checkpoint.py) and the fused Triton backend attached where it can run (fused.py); with `devices=` the
layers are spread over several processes instead (parallel.load)."""

from __future__ import annotations

import os
from typing import Any

import torch

from .backends import attach_default
from .config import CQILConfig, LlamaArgs
from .model import CQILTransformer


class CQILLlama(CQILTransformer):
    """A LLaMA-family causal LM whose CQIL groups run on a shared input (model.CQILTransformer), with
    the fused backend attached: `backend="auto"` runs the Triton kernels on CUDA, torch elsewhere."""

    def __init__(self, args: LlamaArgs, cqil: CQILConfig | None = None, held_layers=None, layer_args=None):
        super().__init__(args, cqil, held_layers, layer_args)
        attach_default(self)

    @classmethod
    def from_pretrained(cls, src: Any, cqil: CQILConfig | dict | str | os.PathLike | None = None,
                        device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, progress: bool = False,
                        lora: str | os.PathLike | None = None, devices=None,
                        held_layers=None, **parallel):
        """Load a LLaMA checkpoint.

        src: a local Hugging Face directory (config.json + *.safetensors or pytorch_model*.bin, sharded
            or not), a transformers LlamaForCausalLM, or a .gguf file (dequantized to `dtype`).
        cqil: a CQILConfig, a dict or JSON file with the authors' keys (`cqil_layers`, `d`), or None:
            then a directory whose config.json carries `cqil_layers` uses it, else no groups. Pass
            CQILConfig() to force the original model. Checked against the config before any weight is read.
        device: default "cuda" when available, else "cpu" (a transformers model: its own device).
        dtype: default bfloat16 on CUDA and float32 on CPU (a transformers model: its own dtype).
        Weights stream tensor by tensor into the model; no second full copy is held. A transformers
        model whose device and dtype already match shares its weight storage with the result.
        lora: a PEFT LoRA adapter directory (e.g. the CQIL authors' released adapters for their
            `cqil_layers`) merged into the weights at load time (lora.py); then nothing is shared.
        devices: several devices, e.g. [0, 1] or ["cpu", "cpu"]: parallel.load(src, devices=...), whose
            keyword arguments (tensor_parallel, backend, one_shot, output_device, timeout_s, ...) are passed on.
        held_layers: read only these layers; the others stay on "meta".
        """
        from .checkpoint import load_pretrained

        if devices is not None:
            if device is not None:
                raise ValueError("pass device (one process) or devices (one process per device), not both")
            from .parallel import load

            return load(src, cqil, devices=devices, dtype=dtype, lora=lora, **parallel)
        if parallel.get("tensor_parallel"):
            raise ValueError("tensor_parallel=True needs several devices: pass devices=[...] (one process each)")
        if parallel:
            raise TypeError(f"from_pretrained got unexpected arguments {sorted(parallel)} (they need devices=)")
        return load_pretrained(cls, src, cqil=cqil, device=device, dtype=dtype, progress=progress, lora=lora,
                               held_layers=held_layers)
