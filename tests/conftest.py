"""Shared fixtures: tiny random LLaMA models built with transformers (the reference implementation),
and the checks every kernel test uses."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors in the interpreter; it must be on before any kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and not os.environ.get("OMP_NUM_THREADS"):
    # pytest -n N: each worker takes its share of the cores for torch's CPU ops; each would otherwise start a
    # thread per core. On a 16-core GPU machine under -n 8, test_finetune's bf16 case on the CPU took 211 s
    # before (under 9 s in CI's 2 cores); with this it is no longer among the slowest 8 (at most 46 s), and
    # the whole suite took 232 s there instead of 368 (benchmarks/results/gpu_tests_h100_91bf60a.json).
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

def _interpreter_broken() -> str | None:
    """Why Triton's CPU interpreter cannot run our kernels in this environment, or None. Triton 3.6's
    interpreter turns scalar kernel arguments into 1-element numpy arrays and calls int() on them, which
    numpy >= 2.4 refuses (the test extras pin numpy<2.4; the lent GPU machines' image has a newer one)."""
    import numpy

    major, minor = (int(x) for x in numpy.__version__.split(".")[:2])
    if (major, minor) >= (2, 4):
        return f"Triton's CPU interpreter fails with numpy {numpy.__version__} (>= 2.4); pip install 'numpy<2.4'"
    return None


# for tests that run kernels in the interpreter on CPU tensors even on a machine with a GPU (CPU ranks)
interpreter = pytest.mark.skipif(_interpreter_broken() is not None, reason=str(_interpreter_broken()))

# The numeric cases of a prototype that lost (benchmarks/persistent_layers.py; docs/performance.md says why), which
# no product path runs: off a GPU, under the interpreter, they took ~3.5 of CI's 20 minutes (2026-12-08), and run
# only with CQIL_PROTOTYPE_TESTS=1; on a GPU they run on CUDA as every other case does. Each prototype keeps its
# cheapest numeric case and its logic tests in CI.
prototype = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("CQIL_PROTOTYPE_TESTS") != "1",
                               reason="a lost prototype's numeric case under the CPU interpreter: "
                                      "CQIL_PROTOTYPE_TESTS=1 runs it")

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


def single_process_model(src, cqil):
    """The one-process float32 model on the CPU, torch backend: what a multi-process model must match."""
    from cqil_kernels import CQILLlama

    model = CQILLlama.from_pretrained(src, cqil=cqil, device="cpu", dtype=torch.float32)
    model.backend = "torch"
    return model


@pytest.fixture
def hf_tiny():
    return random_hf_model()


# The GPU memory each test reserved at its peak (CUDA only), reported at the end of the run: on the H100 at
# d1a3c1f, `pytest -n 12` of five files lost five tests to out-of-memory errors while one worker held 45.9 GiB
# that no report named. Kept in each test's user_properties, which pytest-xdist's workers send back.
@pytest.fixture(autouse=True)
def _gpu_memory_per_test(request):
    """On a GPU: record the test's peak reserved memory, then hand the memory torch's allocator keeps cached
    back to the driver, so that workers sharing the GPU (pytest -n) do not hold what a finished test freed."""
    if not torch.cuda.is_available():
        yield
        return
    torch.cuda.reset_peak_memory_stats()
    yield
    request.node.user_properties.append(("gpu_reserved_gib", torch.cuda.max_memory_reserved() / 2**30))
    torch.cuda.empty_cache()


def pytest_terminal_summary(terminalreporter):
    """The tests that reserved the most GPU memory (those a smaller GPU, or workers sharing one, may not fit)."""
    peaks = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            for name, value in getattr(report, "user_properties", ()):
                if name == "gpu_reserved_gib":
                    peaks[report.nodeid] = value
    if peaks:
        terminalreporter.section("largest GPU memory reserved per test")
        for nodeid, gib in sorted(peaks.items(), key=lambda item: -item[1])[:8]:
            terminalreporter.write_line(f"{gib:8.2f} GiB  {nodeid}")


def left_padding_mask(ids: torch.Tensor, pads: list[int]) -> torch.Tensor:
    """An attention mask like ids, 0 over the first pads[row] positions of each row and 1 elsewhere."""
    positions = torch.arange(ids.shape[1], device=ids.device)
    return (positions[None, :] >= torch.tensor(pads, device=ids.device)[:, None]).to(ids.dtype)


def import_benchmark(name: str):
    """The module benchmarks/<name>.py (its own imports of benchmarks/ modules included), for tests of a
    benchmark's kernels and helpers; sys.path is left as it was."""
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


@pytest.fixture
def sweep_untimed(monkeypatch):
    """A GPU sweep's loop (benchmarks/gemm_configs.py, attention_plans.py) run untimed, on the GPU where there is one
    and on the CPU (the interpreter) elsewhere: a tiny "tiny" shape among cqil bench's, replay.median_us replaced by
    one run of the op that returns 7.0 us, the compiler's facts by fixed ones, a CUDA device claimed on the CPU.
    Yields the list of the ops' outputs, one per timing."""
    from cqil_kernels import bench

    replay, kernel_registers = import_benchmark("replay"), import_benchmark("kernel_registers")
    monkeypatch.setitem(bench.SHAPES, "tiny", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                   head_dim=16, intermediate_size=64, vocab_size=32,
                                                   num_hidden_layers=2))
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "cpu (test)")
    runs = []
    monkeypatch.setattr(replay, "median_us", lambda op, make, nbytes, rounds: (runs.append(op(*make())), 7.0)[1])
    monkeypatch.setattr(kernel_registers, "compile_facts", lambda *args: dict(registers=100, spill_stores=0,
                                                                                spill_loads=0, shared_bytes=0))
    yield runs


def poisoned(shape, dtype, device="cpu") -> torch.Tensor:
    """An output buffer full of NaN, so an element a kernel forgets to write fails the test."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def assert_kernel_close(out: torch.Tensor, twin: torch.Tensor, exact: torch.Tensor, terms: int = 1) -> None:
    """out (a kernel) against its PyTorch twin and a float64 evaluation of the same function.

    The kernel's error against float64 (Frobenius norm) must be at most twice the twin's own error in
    the same dtype, plus one unit in the last place of the output's dtype at the output's scale
    (summation order differs, and the interpreter truncates fp32 -> bf16 instead of rounding), plus
    sqrt(terms) fp32 units for a dot product of `terms` products accumulated in fp32: a kernel thread
    sums its K terms in sequence (error ~ sqrt(K) ulp) where cuBLAS sums in a tree, which on the H100
    made fp32 outputs of K = 576 dots 3-4x less accurate than cuBLAS's (still ~3e-6 relative). NaN, and
    so any element a kernel forgot to write into a NaN-poisoned buffer, fails.
    """
    assert out.shape == exact.shape, (out.shape, exact.shape)
    assert out.dtype == twin.dtype
    assert not out.isnan().any(), "the kernel left elements unwritten (NaN) or produced NaN"
    exact = exact.double().cpu()
    err = (out.double().cpu() - exact).norm().item()
    twin_err = (twin.double().cpu() - exact).norm().item()
    ulp = (torch.finfo(out.dtype).eps + torch.finfo(torch.float32).eps * terms ** 0.5) * exact.norm().item()
    assert err <= 2 * twin_err + ulp, f"kernel error {err:.3g} vs twin's {twin_err:.3g} (ulp {ulp:.3g})"


def assert_greedy_agrees(model, exact, ids: torch.Tensor, new_tokens: int) -> int:
    """Greedy tokens of the Triton backend against the torch backend's, on the same model.

    `exact` is the same model in a wider dtype (torch backend, same grouping). The two backends' tokens
    must be equal, or else, where they first part, (a) the Triton logits' error against `exact` is at
    most twice the torch backend's (plus one ulp of the logit scale), and (b) `exact` itself cannot tell
    the two tokens apart at that precision: its margin between them is within the two backends' errors.
    Flat next-token distributions -- random weights, or a heavily grouped model without fine-tuning --
    have such ties within 32 tokens. Returns the index of the first difference (new_tokens if none)."""
    model.backend = "torch"
    expected = model.generate(ids, new_tokens)
    model.backend = "triton"
    got = model.generate(ids, new_tokens)
    differs = (got != expected).any(0)
    if not bool(differs.any()):
        return new_tokens
    first = int(differs.nonzero()[0])
    prefix = got[:, :first]
    with torch.no_grad():
        ref = exact(prefix.to(exact.device))[:, -1].double().to(prefix.device)
        model.backend = "torch"
        theirs = model(prefix)[:, -1].double()
        model.backend = "triton"
        ours = model(prefix)[:, -1].double()
    ulp = torch.finfo(model.dtype).eps
    for r in (got[:, first] != expected[:, first]).nonzero()[:, 0].tolist():
        err_torch = (theirs[r] - ref[r]).abs().max().item()
        err_triton = (ours[r] - ref[r]).abs().max().item()
        where = f"row {r}, new token {first - ids.shape[1]}"
        assert err_triton <= 2 * err_torch + ulp * ref[r].abs().max().item(), (
            f"{where}: Triton logits error {err_triton:.4g} vs torch backend's {err_torch:.4g}")
        margin = (ref[r, expected[r, first]] - ref[r, got[r, first]]).abs().item()
        assert margin <= err_torch + err_triton, (
            f"{where}: tokens {int(expected[r, first])} / {int(got[r, first])} differ by {margin:.4g} in "
            f"the exact logits, more than the backends' errors {err_torch:.4g} + {err_triton:.4g}")
    return first - ids.shape[1]


class _PlantsAMarker:
    """Unpickling this calls open(marker, "w"): a harmless stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import builtins

        return builtins.open, (self.marker, "w")


def write_malicious_pickle(path, marker) -> None:
    """A torch.save file that creates `marker` when a full (not weights-only) unpickler reads it; tests of
    every loader assert the marker is absent afterwards."""
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "payload": _PlantsAMarker(marker)}, path)


def make_fifo(path):
    """A FIFO at `path` (nothing ever writes to it: a plain read would block forever)."""
    os.mkfifo(path)
    return path
