"""ops.group_gemm against reference.group_gemm and float64, on odd shapes (CPU: TRITON_INTERPRET=1)."""

import json

import pytest
import torch

import cqil_kernels.ops.group_gemm as G
from cqil_kernels import envs
from cqil_kernels.ops.group_gemm import group_down_sum, group_linear, group_swiglu, silu_mul, sum_parts
from cqil_kernels.reference.group_gemm import (group_down_sum_ref, group_linear_ref, group_swiglu_ref, silu_mul_ref,
                                               sum_parts_ref)

from conftest import assert_kernel_close, poisoned

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, K, N): decode-like and prefill-like rows; hidden 576 (SmolLM2) and sizes that are no multiple of 16
SHAPES = [(1, 576, 96), (5, 59, 83), (37, 48, 130)]


def _rand(*shape, dtype, scale=1.0):
    return (scale * torch.randn(*shape, dtype=torch.float64)).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("P", [1, 2, 3, 4])
@pytest.mark.parametrize("shared,norm,bias,res", [(True, True, False, False), (True, True, True, False),
                                                  (False, False, True, False), (True, False, False, False),
                                                  (False, False, True, True)],
                         ids=["qkv", "qkv-bias", "o-bias", "shared", "o-residual"])
def test_group_linear(dtype, M, K, N, P, shared, norm, bias, res):
    torch.manual_seed(P * 1000 + M)
    x = _rand(*((M, K) if shared else (P, M, K)), dtype=dtype, scale=2.0)
    w = _rand(P, N, K, dtype=dtype, scale=K ** -0.5)
    nw = _rand(P, K, dtype=dtype) + 1 if norm else None
    b = _rand(P, N, dtype=dtype) if bias else None
    r = _rand(M, N, dtype=dtype, scale=3.0) if res else None  # the residual stream h, in the model's dtype
    out = group_linear(x, w, norm_weight=nw, eps=1e-5, bias=b, residual=r, out=poisoned((P, M, N), dtype, DEVICE))
    twin = group_linear_ref(x, w, norm_weight=nw, eps=1e-5, bias=b, residual=r)
    d = (lambda t: None if t is None else t.double())
    exact = group_linear_ref(x.double(), w.double(), norm_weight=d(nw), eps=1e-5, bias=d(b), residual=d(r))
    assert_kernel_close(out, twin, exact, terms=K)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("P", [1, 3, 4])
@pytest.mark.parametrize("bias,norm", [(False, False), (True, False), (False, True)],
                         ids=["plain", "bias", "norm"])
def test_group_swiglu(dtype, M, K, N, P, bias, norm):
    """norm: the post-attention RMSNorm applied in the prologue, x being the residual stream h + a."""
    torch.manual_seed(P * 100 + M)
    x = _rand(P, M, K, dtype=dtype, scale=3.0 if norm else 1.0)
    wg, wu = _rand(P, N, K, dtype=dtype, scale=K ** -0.5), _rand(P, N, K, dtype=dtype, scale=K ** -0.5)
    bg, bu = (_rand(P, N, dtype=dtype), _rand(P, N, dtype=dtype)) if bias else (None, None)
    nw = _rand(P, K, dtype=dtype) + 1 if norm else None
    out = group_swiglu(x, wg, wu, norm_weight=nw, eps=1e-5, bias_gate=bg, bias_up=bu,
                       out=poisoned((P, M, N), dtype, DEVICE))
    twin = group_swiglu_ref(x, wg, wu, norm_weight=nw, eps=1e-5, bias_gate=bg, bias_up=bu)
    d = (lambda t: None if t is None else t.double())
    exact = group_swiglu_ref(x.double(), wg.double(), wu.double(), norm_weight=d(nw), eps=1e-5, bias_gate=d(bg),
                             bias_up=d(bu))
    assert_kernel_close(out, twin, exact, terms=K)


def test_each_row_class_times_its_own_candidates():
    """The autotuner's pruning on the GPU's list: 16-row tiles for decode (class 0), the prefill tiles and
    the 32-row batch tiles for 17-64 rows (class 1), the prefill tiles alone for longer prompts."""
    def kept(m_class):
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
                for c in G._prune(G._tuned(), {"M_CLASS": m_class})]
    assert kept(0) == G.TUNED_DECODE
    assert kept(1) == G.TUNED_PREFILL + G.TUNED_BATCH
    assert kept(2) == kept(3) == kept(4) == G.TUNED_PREFILL
    assert [G.row_class(M) for M in (1, 16, 17, 32, 64, 65)] == [0, 0, 1, 1, 1, 2]


@pytest.mark.parametrize("config", G.TUNED_DECODE + G.TUNED_BATCH + G.TUNED_PREFILL,
                         ids=lambda c: "bm{}-bn{}-bk{}-w{}-s{}".format(*c))
def test_every_config_the_autotuner_may_choose(monkeypatch, config):
    """Each of the GPU autotuner's candidates, forced (the tests' fixed configs and the interpreter's are
    others), against the reference and float64: the QKV form (the input norm's sums of squares from x x^T in
    tiles of up to 32 rows, a second pass over x in larger ones) and gate/up with the norm, on rows of the
    config's row class that leave its last tile part-empty, and sizes no multiple of the tile."""
    bm, bn, bk, warps, stages = config
    chosen = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)

    class Always(dict):  # group_gemm._CHOSEN: every key's choice is this config
        def get(self, key, default=None):
            return chosen
    monkeypatch.setattr(G, "_CHOSEN", Always())
    M = {16: 5, 32: 29}.get(bm, 70)
    K, N, dtype = 2 * bk + 40, 2 * bn + 3, torch.bfloat16  # every loop runs 3 tiles, the last part-empty
    torch.manual_seed(bm * bn + bk)
    x = _rand(2, M, K, dtype=dtype, scale=2.0)
    w, wu = _rand(2, N, K, dtype=dtype, scale=K ** -0.5), _rand(2, N, K, dtype=dtype, scale=K ** -0.5)
    nw = _rand(2, K, dtype=dtype) + 1
    out = group_linear(x, w, norm_weight=nw, eps=1e-5, out=poisoned((2, M, N), dtype, DEVICE))
    exact = group_linear_ref(x.double(), w.double(), norm_weight=nw.double(), eps=1e-5)
    assert_kernel_close(out, group_linear_ref(x, w, norm_weight=nw, eps=1e-5), exact, terms=K)
    out = group_swiglu(x, w, wu, norm_weight=nw, eps=1e-5, out=poisoned((2, M, N), dtype, DEVICE))
    exact = group_swiglu_ref(x.double(), w.double(), wu.double(), norm_weight=nw.double(), eps=1e-5)
    assert_kernel_close(out, group_swiglu_ref(x, w, wu, norm_weight=nw, eps=1e-5), exact, terms=K)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,F,D", [(1, 83, 576), (7, 130, 59), (33, 64, 48)])
@pytest.mark.parametrize("P", [1, 2, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_group_down_sum(dtype, M, F, D, P, bias):
    torch.manual_seed(P * 10 + M)
    x = _rand(P, M, F, dtype=dtype)
    w = _rand(P, D, F, dtype=dtype, scale=F ** -0.5)
    res = _rand(M, D, dtype=torch.float32)
    b = _rand(P, D, dtype=dtype) if bias else None
    out = group_down_sum(x, w, res, bias=b, out=poisoned((M, D), dtype, DEVICE))
    twin = group_down_sum_ref(x, w, res, bias=b)
    exact = group_down_sum_ref(x.double(), w.double(), res.double(), bias=None if b is None else b.double())
    assert_kernel_close(out, twin, exact, terms=P * F)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,F,D,split", [(1, 96, 59, True), (5, 48, 576, True), (16, 64, 33, True),
                                         (1, 88, 40, False), (17, 64, 33, False)])
def test_group_down_sum_split_k(monkeypatch, dtype, M, F, D, split):
    """P = 1 decode with K split in two halves (SPLIT_K_MIN lowered to reach it on small shapes); F not a
    multiple of 16 and prefill rows keep one GEMM."""
    import cqil_kernels.ops.group_gemm as G

    monkeypatch.setattr(G, "SPLIT_K_MIN", 32)
    launches = []
    kernel = G._sum_p_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]
    monkeypatch.setattr(G, "_sum_p_kernel", Spy())
    torch.manual_seed(M * 7 + F)
    x = _rand(1, M, 2 * F, dtype=dtype)[:, :, :F]  # rows with a stride of 2F: the halves must follow it
    w = _rand(1, D, F, dtype=dtype, scale=F ** -0.5)
    res = _rand(M, D, dtype=dtype, scale=2.0)
    out = group_down_sum(x, w, res, out=poisoned((M, D), dtype, DEVICE))
    assert len(launches) == int(split)
    twin = group_down_sum_ref(x, w, res)
    exact = group_down_sum_ref(x.double(), w.double(), res.double())
    assert_kernel_close(out, twin, exact, terms=F)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("res_dtype", [None, torch.float32, "same"], ids=["no-residual", "fp32-residual", "residual"])
@pytest.mark.parametrize("n,M,N", [(1, 7, 59), (3, 5, 1100), (4, 1, 4096), (2, 0, 8)])
def test_sum_parts(dtype, res_dtype, n, M, N):
    """residual + parts[0] + parts[1] + ... in fp32 in that order, rounded once (the cuBLAS prefill
    form's epilogue: parts are a batched matmul's products in the model's dtype)."""
    parts = _rand(n, M, N, dtype=dtype)
    residual = None if res_dtype is None else _rand(M, N, dtype=dtype if res_dtype == "same" else res_dtype,
                                                    scale=3.0)
    out = poisoned((M, N), dtype, DEVICE)
    got = sum_parts(parts, residual, out=out)
    assert got is out
    exact = sum_parts_ref(parts.double(), None if residual is None else residual.double())
    assert_kernel_close(got, sum_parts_ref(parts, residual), exact, terms=n + 1)
    if dtype != torch.bfloat16:  # the same additions in the same order: the same bits (the interpreter
        torch.testing.assert_close(got, sum_parts_ref(parts, residual), rtol=0, atol=0)  # truncates bf16)
    fp32_parts = _rand(n, M, N, dtype=torch.float32)  # split-K partials, out in the model's dtype
    assert sum_parts(fp32_parts, residual, dtype=dtype).dtype == dtype


def test_sum_parts_bad_input():
    parts = torch.zeros(2, 3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="residual must have shape"):
        sum_parts(parts, torch.zeros(3, 9, device=DEVICE))
    with pytest.raises(ValueError, match="at least one"):
        sum_parts(parts[:0])
    with pytest.raises(ValueError, match="parts must have 3"):
        sum_parts(parts[0])
    with pytest.raises(ValueError, match="out must have shape"):
        sum_parts(parts, out=torch.zeros(3, 9, device=DEVICE))
    with pytest.raises(TypeError, match="out must be"):
        sum_parts(parts, dtype=torch.float16, out=torch.zeros(3, 8, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 7, 83), (3, 1, 4099), (2, 0, 5)])
def test_silu_mul(dtype, shape):
    g, u = _rand(*shape, dtype=dtype, scale=4.0), _rand(*shape, dtype=dtype)
    out = poisoned(shape, dtype, DEVICE)
    assert silu_mul(g, u, out=out) is out
    assert_kernel_close(out, silu_mul_ref(g, u), silu_mul_ref(g.double(), u.double()))
    for bad in (dict(u=u.float() if dtype != torch.float32 else u.half()), dict(u=u[..., :-1]),
                dict(g=g.transpose(0, 1)), dict(out=torch.empty(0, device=DEVICE))):
        with pytest.raises(ValueError):
            silu_mul(**{**dict(g=g, u=u), **bad})


def test_row_classes_bound_each_autotuned_config_to_a_range_of_rows():
    """The autotuner keys on row_class(M): decode rows, then one class per factor of 4, so a config tuned
    for a short prompt is not reused for a long one (it was: 17 rows and 4096 shared a class)."""
    from cqil_kernels.ops.group_gemm import row_class

    bounds = {1: 0, 16: 0, 17: 1, 64: 1, 65: 2, 256: 2, 257: 3, 1024: 3, 1025: 4, 4096: 4, 1 << 20: 4}
    assert {M: row_class(M) for M in bounds} == bounds


def test_the_autotuner_keeps_its_timings_on_disk_where_triton_can():
    """Triton >= 3.4 keeps each key's config timings in its cache dir (cache_results): a later process takes the
    tuned config without timing them all again; older Triton has no such option and gets none, and Triton
    turns it off under its interpreter (which times nothing)."""
    import inspect

    import triton

    from cqil_kernels.ops import group_gemm as G
    from cqil_kernels.ops._common import interpreting

    supported = "cache_results" in inspect.signature(triton.autotune).parameters
    assert G._group_gemm_kernel.cache_results is (supported and not interpreting())
    assert G.autotune_disk_cache() == ({"cache_results": True} if supported else {})


@pytest.mark.parametrize("M,expected_class", [(5, 0), (40, 1), (300, 3)])
def test_launches_go_through_the_autotuner_once_per_key_then_to_its_choice(monkeypatch, M, expected_class):
    """The row class reaches the autotuner's key; the first launch of a key goes through triton.autotune (on a GPU
    a decode key through group_gemm._tune_decode, which launches the kernel directly), later ones straight to the
    config chosen (group_gemm._CHOSEN), with the same results."""
    import cqil_kernels.ops.group_gemm as G

    launches, direct_kwargs = [], {}
    kernel = G._group_gemm_kernel

    class Spy:  # stands in for the autotuned kernel: records each launch's path and row class
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(("autotuner", args[kernel.arg_names.index("M_CLASS")]))
                return kernel[grid](*args, **kwargs)
            return launch

        @property
        def best_config(self):
            return kernel.best_config

        @property
        def configs(self):
            return kernel.configs

        @property
        def fn(self):
            class Direct:
                def __getitem__(self, grid):
                    def launch(*args, **kwargs):
                        launches.append(("direct", args[kernel.arg_names.index("M_CLASS")]))
                        direct_kwargs.update(kwargs)
                        return kernel.fn[grid](*args, **kwargs)
                    return launch
            return Direct()
    monkeypatch.setattr(G, "_group_gemm_kernel", Spy())
    monkeypatch.setattr(G, "_CHOSEN", {})
    torch.manual_seed(M)
    x, w = _rand(M, 24, dtype=torch.float32), _rand(1, 20, 24, dtype=torch.float32)
    twin, exact = group_linear_ref(x, w), group_linear_ref(x.double(), w.double())
    for _ in range(2):
        out = group_linear(x, w, out=poisoned((1, M, 20), torch.float32, DEVICE))
        assert_kernel_close(out, twin, exact, terms=24)
    first = "direct" if G._tunes_here(x) and expected_class == 0 else "autotuner"
    assert launches[0] == (first, expected_class) and launches[-1] == ("direct", expected_class)
    assert len(launches) == 2 or (first == "direct" and G.autotuning())  # (the tuner's own launches)
    key = (expected_class, 20, 24, 1) + (False,) * 5 + (torch.float32,) * 8
    assert list(G._CHOSEN) == [key]
    assert direct_kwargs.items() >= G._CHOSEN[key].items() and "BLOCK_M" in G._CHOSEN[key]


DECODE_CANDIDATES = [(16, 32, 64, 4, 3), (16, 16, 32, 4, 2), (16, 64, 32, 2, 3)]


@pytest.fixture(autouse=True)
def _own_cache_dir(tmp_path):
    """Each test its own cache dir: the decode configs _tune_decode keeps on disk stay out of the user's."""
    from cqil_kernels import envs

    with envs.overridden(CQIL_CACHE_DIR=str(tmp_path / "cache")):
        yield


def _tune_a_decode_launch(monkeypatch, timer, swiglu: bool):
    """A decode launch (M = 3, P = 2, weights a slice of a packed tensor) tuned by group_gemm._tune_decode over
    DECODE_CANDIDATES (and a prompt's config, which it must not consider), each candidate timed by timer(launch):
    (the output, the twin's, float64's, the config chosen). The launcher's memory (_CHOSEN) starts empty; timer
    None keeps the timer set before."""
    monkeypatch.setattr(G._group_gemm_kernel, "configs", [G._config(*c) for c in DECODE_CANDIDATES]
                        + [G._config(64, 64, 64, 4, 3)])
    monkeypatch.setattr(G, "_CHOSEN", {})
    monkeypatch.setattr(G, "_tunes_here", lambda x: True)
    if timer is not None:
        monkeypatch.setattr(G, "_graph_us", timer)
    torch.manual_seed(3)
    M, K, N = 3, 70, 50
    x = _rand(2, M, K, dtype=torch.float32)
    packed = _rand(2, 2 * N + 6, K, dtype=torch.float32, scale=K ** -0.5)
    w, wu = packed[:, 3:N + 3], packed[:, N + 6:]
    if swiglu:
        out = group_swiglu(x, w, wu, out=poisoned((2, M, N), torch.float32, DEVICE))
        twin, exact = group_swiglu_ref(x, w, wu), group_swiglu_ref(x.double(), w.double(), wu.double())
    else:
        out = group_linear(x, w, out=poisoned((2, M, N), torch.float32, DEVICE))
        twin, exact = group_linear_ref(x, w), group_linear_ref(x.double(), w.double())
    (chosen,) = G._CHOSEN.values()
    return out, twin, exact, (chosen["BLOCK_M"], chosen["BLOCK_N"], chosen["BLOCK_K"], chosen["num_warps"],
                              chosen["num_stages"])


@pytest.mark.parametrize("swiglu", [False, True], ids=["linear", "swiglu"])
def test_a_decode_key_takes_its_fastest_candidate_timed_over_copies_of_the_weights(monkeypatch, swiglu):
    """group_gemm._tune_decode with a timer that runs each candidate once on a later set of arguments (a copy of the
    weights, strides kept) and returns a set time: the decode candidates alone are timed, the fastest is chosen,
    each candidate computes the product from the copies, and a candidate that runs out of GPU resources (raised by
    its first launch) is never chosen."""
    from triton.runtime.errors import OutOfResources

    times = {(16, 32, 64, 4, 3): 3.0, (16, 16, 32, 4, 2): 1.0, (16, 64, 32, 2, 3): 2.0}
    real_fn, fails = G._group_gemm_kernel.fn, set()
    launched = []  # (config, the output after the launch)

    class Recorded:  # the kernel, recording each launch's config and output; a config in `fails` cannot run
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                config = tuple(kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"))
                if config in fails:
                    raise OutOfResources(300000, 232448, "shared memory")
                real_fn[grid](*args, **kwargs)
                launched.append((config, args[7].clone()))
            return launch
    monkeypatch.setattr(G._group_gemm_kernel, "fn", Recorded())
    timed = []

    def timer(launch):
        launch(5)  # the fifth copy of the weights
        timed.append(launched[-1])
        return times[launched[-1][0]]

    for fail in [None, (16, 16, 32, 4, 2)]:
        fails.add(fail)
        timed.clear()
        (envs.cache_dir() / G.TUNED_FILE).unlink(missing_ok=True)  # no choice kept from the round before
        out, twin, exact, chosen = _tune_a_decode_launch(monkeypatch, timer, swiglu)
        assert [config for config, _ in timed] == [c for c in DECODE_CANDIDATES if c != fail]
        assert chosen == ((16, 16, 32, 4, 2) if fail is None else (16, 64, 32, 2, 3))
        for _, got in timed + [(chosen, out)]:
            assert_kernel_close(got, twin, exact, terms=70)


def test_a_decode_choice_is_kept_on_disk_for_later_processes(monkeypatch):
    """The first process times and writes its choice to the cache dir; a later one (the launcher's memory empty)
    takes it untimed. A file that is not JSON, an entry that is no index of the candidates, and another candidate
    list are timed again; a cache dir that cannot be written only costs the timing."""
    calls = []

    def timer(launch):
        calls.append(1)
        return float(len(calls) % 3)  # the third candidate of each timing (0.0) is the fastest
    path = envs.cache_dir() / G.TUNED_FILE
    assert _tune_a_decode_launch(monkeypatch, timer, False)[3] == DECODE_CANDIDATES[2] and len(calls) == 3
    kept = json.loads(path.read_text())
    assert list(kept.values()) == [2]
    monkeypatch.setattr(G, "_graph_us", lambda launch: pytest.fail("timed a choice kept on disk"))
    out, twin, exact, chosen = _tune_a_decode_launch(monkeypatch, None, False)
    assert chosen == DECODE_CANDIDATES[2]
    assert_kernel_close(out, twin, exact, terms=70)
    for bad in ["{not json", json.dumps({entry: 7 for entry in kept}), json.dumps({e: "1" for e in kept}), "[2]"]:
        path.write_text(bad)
        calls.clear()
        assert _tune_a_decode_launch(monkeypatch, timer, False)[3] == DECODE_CANDIDATES[2] and len(calls) == 3
        assert json.loads(path.read_text()) == kept
    calls.clear()
    assert _tune_a_decode_launch(monkeypatch, timer, True)[3] == DECODE_CANDIDATES[2] and len(calls) == 3
    assert len(json.loads(path.read_text())) == 2  # SwiGLU's flags: another entry
    path.unlink()
    path.parent.chmod(0o500)  # read-only
    try:
        calls.clear()
        assert _tune_a_decode_launch(monkeypatch, timer, False)[3] == DECODE_CANDIDATES[2] and len(calls) == 3
    finally:
        path.parent.chmod(0o700)


def test_the_kept_decode_choices_are_the_newest_and_bounded(monkeypatch):
    """The file keeps the TUNED_KEEP entries written last: entries of older sources (never read again) do not
    pile up. A choice written again moves to the newest; entries another process wrote meanwhile are kept."""
    monkeypatch.setattr(G, "TUNED_KEEP", 3)
    path = envs.cache_dir() / G.TUNED_FILE
    for i in range(4):
        G._keep_tuned(f"e{i}", i)
    assert list(json.loads(path.read_text()).items()) == [("e1", 1), ("e2", 2), ("e3", 3)]
    G._keep_tuned("e1", 0)
    assert list(json.loads(path.read_text()).items()) == [("e2", 2), ("e3", 3), ("e1", 0)]
    path.write_text(json.dumps({"other": 1, **json.loads(path.read_text())}))  # another process's, oldest first
    G._keep_tuned("e4", 4)
    assert list(json.loads(path.read_text())) == ["e3", "e1", "e4"]


def test_a_decode_key_is_tuned_over_fewer_weight_copies_when_memory_runs_out(monkeypatch):
    """The copies are made until the GPU's memory runs out (here after two): the timing cycles over the original
    and those two, every launch computes the product, the fastest is chosen."""
    real_copy, copies = G._strided_copy, []

    def scarce(t):
        if len(copies) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        copies.append(real_copy(t))
        return copies[-1]
    monkeypatch.setattr(G, "_strided_copy", scarce)
    real_fn, launched = G._group_gemm_kernel.fn, []

    class Recorded:  # the kernel, recording each launch's weight and output
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                real_fn[grid](*args, **kwargs)
                launched.append((args[1].data_ptr(), args[7].clone()))
            return launch
    monkeypatch.setattr(G._group_gemm_kernel, "fn", Recorded())

    def timer(launch):
        del launched[:]
        for i in range(4):
            launch(i)
        return 1.0  # every candidate the same: the first is kept

    out, twin, exact, chosen = _tune_a_decode_launch(monkeypatch, timer, False)
    assert len(copies) == 2 and chosen == DECODE_CANDIDATES[0]
    weights = [w for w, _ in launched]
    assert weights[1:3] == [c.data_ptr() for c in copies] and weights[0] == weights[3] not in weights[1:3]
    for _, got in launched:  # the last candidate's four, then the launch itself
        assert_kernel_close(got, twin, exact, terms=70)
    assert_kernel_close(out, twin, exact, terms=70)


def test_forms_of_equal_sizes_are_tuned_apart(monkeypatch):
    """QKV's form (the input norm) and a plain product of the same sizes and dtypes are two keys, each timed and
    chosen on its own: a model whose F equals its QKV width would otherwise run gate/up with QKV's tiles."""
    monkeypatch.setattr(G._group_gemm_kernel, "configs", [G._config(*c) for c in DECODE_CANDIDATES])
    monkeypatch.setattr(G, "_CHOSEN", {})
    monkeypatch.setattr(G, "_tunes_here", lambda x: True)
    timed = []
    monkeypatch.setattr(G, "_graph_us", lambda launch: timed.append(1) or float(len(timed) % 3))
    x, w = _rand(2, 24, dtype=torch.float32), _rand(1, 20, 24, dtype=torch.float32)
    nw = _rand(1, 24, dtype=torch.float32)
    for norm in (None, nw, None):
        got = group_linear(x, w, norm_weight=norm)
        twin = group_linear_ref(x, w, norm_weight=norm)
        exact = group_linear_ref(x.double(), w.double(), norm_weight=None if norm is None else norm.double())
        assert_kernel_close(got, twin, exact, terms=24)
    assert len(G._CHOSEN) == 2 and len(timed) == 2 * len(DECODE_CANDIDATES)


def test_decode_keys_with_one_candidate_are_not_timed(monkeypatch):
    monkeypatch.setattr(G._group_gemm_kernel, "configs", [G._config(16, 32, 64, 4, 3), G._config(64, 64, 64, 4, 3)])
    monkeypatch.setattr(G, "_CHOSEN", {})
    monkeypatch.setattr(G, "_tunes_here", lambda x: True)
    monkeypatch.setattr(G, "_graph_us", lambda launch: pytest.fail("timed a single candidate"))
    x, w = _rand(2, 24, dtype=torch.float32), _rand(1, 20, 24, dtype=torch.float32)
    assert_kernel_close(group_linear(x, w), group_linear_ref(x, w), group_linear_ref(x.double(), w.double()),
                        terms=24)
    assert [c["BLOCK_N"] for c in G._CHOSEN.values()] == [32]


@pytest.mark.skipif(DEVICE != "cuda", reason="times CUDA graphs")
def test_a_decode_key_is_tuned_on_the_gpu_by_timing_graphs(monkeypatch):
    """The real timer (CUDA graphs of TUNE_CALLS launches, CUDA events) picks one of the candidates; the
    launch's output is the product."""
    out, twin, exact, chosen = _tune_a_decode_launch(monkeypatch, G._graph_us, swiglu=True)
    assert chosen in DECODE_CANDIDATES
    assert_kernel_close(out, twin, exact, terms=70)


def test_inputs_are_copied_enough_times_to_stay_out_of_l2(monkeypatch):
    from cqil_kernels.ops._common import input_copies

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the H100's 50 MiB
    MiB = 2**20
    assert [input_copies(n * MiB, 24) for n in (1, 10, 50, 100, 125, 126, 500)] == [24, 13, 3, 2, 1, 1, 1]
    assert input_copies(0, 24) == 24 and input_copies(MiB, 4) == 4


def test_weights_may_be_a_slice_of_a_larger_packed_tensor():
    """The model passes layer slices [l0:l0+P] of all-layer tensors; strides stay those of the whole."""
    packed = _rand(6, 40, 48, dtype=torch.float32)
    x = _rand(3, 48, dtype=torch.float32)
    out = group_linear(x, packed[2:5])
    torch.testing.assert_close(out, group_linear_ref(x, packed[2:5]))


# --------------------------------------------------------------------------------------------------
# Bad input: a clear error before launch


def test_bad_input_is_refused():
    x = _rand(3, 48, dtype=torch.float32)
    w = _rand(2, 40, 48, dtype=torch.float32)
    with pytest.raises(ValueError, match="features"):
        group_linear(_rand(3, 47, dtype=torch.float32), w)
    with pytest.raises(TypeError, match="w must be torch.float32"):
        group_linear(x, w.half())
    with pytest.raises(ValueError, match="P = 2"):
        group_linear(_rand(3, 3, 48, dtype=torch.float32), w)
    with pytest.raises(ValueError, match="contiguous"):
        group_linear(x, w.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match="last dimension"):
        group_linear(_rand(48, 3, dtype=torch.float32).t(), w)
    with pytest.raises(ValueError, match="norm_weight must have shape"):
        group_linear(x, w, norm_weight=_rand(2, 40, dtype=torch.float32))
    with pytest.raises(TypeError, match="not supported"):
        group_linear(x.double(), w.double())
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        group_linear(x.tolist(), w)
    with pytest.raises(ValueError, match="out must have shape"):
        group_linear(x, w, out=torch.empty(2, 3, 41, device=DEVICE))
    with pytest.raises(ValueError, match="bias_gate and bias_up"):
        group_swiglu(x, w, w, bias_gate=_rand(2, 40, dtype=torch.float32))
    with pytest.raises(ValueError, match="residual must have shape"):
        group_linear(x, w, residual=_rand(3, 48, dtype=torch.float32))
    with pytest.raises(ValueError, match="norm_weight must have shape"):
        group_swiglu(x, w, w, norm_weight=_rand(2, 40, dtype=torch.float32))
    with pytest.raises(ValueError, match="residual must have shape"):
        group_down_sum(_rand(2, 3, 48, dtype=torch.float32), w, _rand(3, 41, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"\[P, M, F\]"):
        group_down_sum(x, w)


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU-only: the refusal of CPU tensors outside the interpreter")
def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    import cqil_kernels.ops._common as common

    monkeypatch.setattr(common, "_INTERPRETED", False)  # as if imported without TRITON_INTERPRET=1
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        group_linear(_rand(3, 48, dtype=torch.float32), _rand(2, 40, 48, dtype=torch.float32))
