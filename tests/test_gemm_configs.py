"""benchmarks/gemm_configs.py's parts that need no timing, on the GPU where there is one (else in the interpreter):
a forced config runs alone and is put back, and each launch form computes what the op computes."""

import pytest
import torch
import triton

from cqil_kernels.ops import group_gemm

from conftest import import_benchmark

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

TINY = dict(D=48, H=2, Hkv=1, Dh=16, F=64, V=40)

gemm_configs = import_benchmark("gemm_configs")


@pytest.mark.parametrize("form", gemm_configs.FORMS)
def test_a_forced_config_computes_the_form_and_is_put_back(form):
    torch.manual_seed(0)
    op, make, nbytes = gemm_configs.form_inputs(form, TINY, 2, 3, DEVICE, torch.float32, scale=0.2)
    inputs = make()
    assert nbytes > 0
    default = op(*inputs)
    configs, chosen = group_gemm._group_gemm_kernel.configs, dict(group_gemm._CHOSEN)
    forced = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4, num_stages=2)
    with gemm_configs.forced_config(forced):
        got = op(*inputs)
        assert group_gemm._group_gemm_kernel.configs == [forced]
        # the launcher remembers what the autotuner chose for each launch of the form: the forced config alone
        assert group_gemm._CHOSEN and all(c == forced.all_kwargs() for c in group_gemm._CHOSEN.values())
    assert group_gemm._group_gemm_kernel.configs is configs and group_gemm._CHOSEN == chosen
    torch.testing.assert_close(got, default, rtol=1e-5, atol=1e-5)  # another K split: another fp32 order


def test_config_arguments_are_parsed_and_refused():
    assert gemm_configs.parse_config("16,32,128,8,6") == (16, 32, 128, 8, 6)
    with pytest.raises(Exception, match="BLOCK_M,BLOCK_N,BLOCK_K,warps,stages"):
        gemm_configs.parse_config("16,32,128")


def test_the_sweep_writes_a_row_per_shape_form_and_config(sweep_untimed, monkeypatch, tmp_path):
    """main's loop untimed (sweep_untimed: the timing and the compiler's facts replaced, a tiny shape)."""
    import json

    monkeypatch.setattr(gemm_configs, "DEVICE", DEVICE)
    out = tmp_path / "sweep.json"
    gemm_configs.main(["--shape", "tiny", "--form", "qkv", "--form", "down", "--extra", "16,16,32,4,2",
                       "--rounds", "2", "--out", str(out)])
    record = json.loads(out.read_text())
    import_benchmark("tables").check(record, out.name)
    configs = len(group_gemm.TUNED_DECODE) + 1
    assert len(record["rows"]) == len(sweep_untimed) == 2 * configs
    assert [row[1] for row in record["rows"]] == ["qkv"] * configs + ["down"] * configs
    assert sum(row[9] for row in record["rows"]) == 2  # the extra config, once per form
    assert all(row[3] == 7.0 for row in record["rows"])


def test_the_launchers_choice_and_the_autotuners_are_read_apart(monkeypatch, tmp_path):
    """launcher_choice: the launcher's own pick (here the tuner's, the second candidate timed faster) and, with
    autotuner=True, triton.autotune's for the same launch (the interpreter's untimed autotuner takes the first);
    the launcher's memory and its tuning switch are put back."""
    from cqil_kernels import envs
    from cqil_kernels.ops import group_gemm as G

    candidates = [(16, 32, 32, 4, 3), (16, 16, 32, 4, 2)]
    monkeypatch.setattr(G._group_gemm_kernel, "configs", [G._config(*c) for c in candidates])
    monkeypatch.setattr(G, "_tunes_here", lambda x: True)
    timings = iter([2.0, 1.0])
    monkeypatch.setattr(G, "_graph_us", lambda launch: next(timings))
    monkeypatch.setattr(G, "_CHOSEN", {"kept": {}})
    autotuner_memory = G._group_gemm_kernel.cache
    op, make, _ = gemm_configs.form_inputs("lm_head", TINY, 1, 2, DEVICE, torch.float32, scale=0.2)
    with envs.overridden(CQIL_CACHE_DIR=str(tmp_path)):
        inputs = make()
        assert gemm_configs.launcher_choice(op, inputs) == candidates[1]
        autotuned = gemm_configs.launcher_choice(op, inputs, autotuner=True)
    assert autotuned in candidates and (DEVICE == "cuda" or autotuned == candidates[0])
    assert G._CHOSEN == {"kept": {}} and G._tunes_here(None) is True
    assert G._group_gemm_kernel.cache is autotuner_memory


def test_the_choosing_is_timed_twice_with_nothing_kept_on_disk(monkeypatch, tmp_path):
    """timed_choice: the launcher's choice timed twice, each time choosing anew (the tuner's timer runs for both;
    the first choice is not taken from the disk by the second), in a temporary cache dir, not the user's."""
    from cqil_kernels import envs
    from cqil_kernels.ops import group_gemm as G

    candidates = [(16, 32, 32, 4, 3), (16, 16, 32, 4, 2)]
    monkeypatch.setattr(G._group_gemm_kernel, "configs", [G._config(*c) for c in candidates])
    monkeypatch.setattr(G, "_tunes_here", lambda x: True)
    timed = []
    monkeypatch.setattr(G, "_graph_us", lambda launch: timed.append(1) or 2.0 + len(timed) % 2)
    op, make, _ = gemm_configs.form_inputs("o_proj", TINY, 2, 3, DEVICE, torch.float32, scale=0.2)
    with envs.overridden(CQIL_CACHE_DIR=str(tmp_path)):
        best, first_ms, again_ms = gemm_configs.timed_choice(op, make())
    assert best == candidates[1] and len(timed) == 4 and first_ms > 0 and again_ms > 0
    assert not any(tmp_path.iterdir())
