"""Tensor parallelism and the hybrid placement (parallel/placement.py, rank.py): the shards, the Triton path
of each kind of placement under the interpreter against the single-process model (CPU processes, gloo; the
torch path of the same placements runs with CQIL's cases in tests/test_parallel.py), LoRA adapters merged
into shards, and bad input refused before any process starts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from cqil_kernels import CQILConfig, CQILLlama
from cqil_kernels.config import LlamaArgs
from cqil_kernels.parallel import Placement

from conftest import interpreter, left_padding_mask, random_hf_model, single_process_model

LAYERS = 6
SHAPE = dict(num_hidden_layers=LAYERS, hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=88, attention_bias=True, mlp_bias=True)
PAIRS = ((1, 2), (3, 4))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tp")
    random_hf_model(seed=7, **SHAPE).save_pretrained(path)
    return path


# (world, grouping) of the Triton path's cases; the torch path of these placements is tested with CQIL's in
# tests/test_parallel.py (CASES)
CASES = {
    "tp-w2": (2, CQILConfig()),
    "hybrid-w2-d1": (2, CQILConfig(groups=PAIRS, bypass=1)),
    "hybrid-w4-P2xTP2-d1-mlp_input": (4, CQILConfig(groups=PAIRS, bypass=1, bypass_mode="mlp_input")),
}


@interpreter
@pytest.mark.parametrize("case", ["tp-w2", "hybrid-w4-P2xTP2-d1-mlp_input", "hybrid-w2-d1"])
def test_triton_backend_matches_single_process(checkpoint, case, monkeypatch):
    """The fused path of split stages (shards' QKV/RoPE/attention/o_proj, the attention sums, the MLP
    shards and the reduction of the partial products) under the interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU ranks: the interpreter, also on a machine with a GPU
    world, cqil = CASES[case]
    single = single_process_model(checkpoint, cqil)
    ids = torch.randint(0, single.args.vocab_size, (2, 7), generator=torch.Generator().manual_seed(4))
    mask = left_padding_mask(ids, [0, 2])
    with torch.no_grad():
        expected = single(ids, mask)
    with CQILLlama.from_pretrained(checkpoint, cqil=cqil, devices=["cpu"] * world, dtype=torch.float32,
                                   backend="triton", tensor_parallel=True, timeout_s=300) as parallel:
        torch.testing.assert_close(parallel(ids, mask)[mask.bool()], expected[mask.bool()], atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(parallel.generate(ids, 4, attention_mask=mask),
                                   single.generate(ids, 4, attention_mask=mask), rtol=0, atol=0)


def test_lora_adapter_is_merged_into_the_shards(checkpoint, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(checkpoint)
    adapter = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn_like(p))
    adapter.save_pretrained(tmp_path)
    cqil = CQILConfig(groups=PAIRS)
    single = CQILLlama.from_pretrained(checkpoint, cqil=cqil, device="cpu", lora=tmp_path)
    single.backend = "torch"
    ids = torch.randint(0, single.args.vocab_size, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = single(ids)
    with CQILLlama.from_pretrained(checkpoint, cqil=cqil, devices=["cpu"] * 4, lora=tmp_path, backend="torch",
                                   tensor_parallel=True, timeout_s=120) as parallel:
        torch.testing.assert_close(parallel(ids), expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# The placement itself


def _args(**overrides) -> LlamaArgs:
    return LlamaArgs(**{**dict(vocab_size=97, hidden_size=64, intermediate_size=88, num_hidden_layers=LAYERS,
                               num_attention_heads=8, num_key_value_heads=2, head_dim=8), **overrides})


def test_shards_put_together_are_the_weights():
    """Concatenating every rank's shard of a tensor gives the tensor back (q, gate and up by rows, o_proj
    and down by columns); key/value heads are split or, with fewer heads than ranks, each rank keeps the
    one its query heads share; row-parallel biases are shard 0's."""
    args = _args()
    g = torch.Generator().manual_seed(0)
    full = {"q_proj": torch.randn(64, 64, generator=g), "k_proj": torch.randn(16, 64, generator=g),
            "gate_proj": torch.randn(88, 64, generator=g), "down_proj": torch.randn(64, 88, generator=g),
            "o_proj": torch.randn(64, 64, generator=g)}
    for world in (2, 4):
        parts = [Placement.build(r, world, args, CQILConfig(), tensor_parallel=True) for r in range(world)]

        def name(module, kind="weight"):
            block = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            return f"layers.2.{block}.{module}.{kind}"

        for module, dim in (("q_proj", 0), ("gate_proj", 0), ("down_proj", 1), ("o_proj", 1)):
            torch.testing.assert_close(torch.cat([p.take(name(module), full[module]) for p in parts], dim),
                                       full[module], rtol=0, atol=0)
        k_shards = [p.take(name("k_proj"), full["k_proj"]) for p in parts]
        if world == 2:
            torch.testing.assert_close(torch.cat(k_shards), full["k_proj"], rtol=0, atol=0)
        else:  # heads 0-1 and 2-3 use kv head 0, heads 4-5 and 6-7 kv head 1
            for r, shard in enumerate(k_shards):
                torch.testing.assert_close(shard, full["k_proj"][(r // 2) * 8:(r // 2 + 1) * 8], rtol=0, atol=0)
        bias = torch.randn(64, generator=g)
        shards = [p.take(name("o_proj", "bias"), bias) for p in parts]
        assert torch.equal(shards[0], bias) and all(not s.any() for s in shards[1:])
        assert parts[1].take("embed_tokens.weight", bias) is bias
        assert parts[1].layer_args(2, args).num_attention_heads == 8 // world
        assert parts[1].layer_args(2, args).num_key_value_heads == max(1, 2 // world)
        assert parts[1].layer_args(2, args).intermediate_size == 88 // world


def test_the_hybrid_places_groups_and_counts_reductions():
    args = _args()
    p = [Placement.build(r, 4, args, CQILConfig(groups=PAIRS), tensor_parallel=True) for r in range(4)]
    # stages (0,) (1, 2) (3, 4) (5,): layers outside groups over all 4 ranks, each pair's layers over 2
    assert [part.layers for part in p[3].parts] == [(0,), (2,), (4,), (5,)]
    assert [(part.shard, part.shards, part.peers) for part in p[3].parts] == [
        (3, 4, (0, 1, 2, 3)), (1, 2, (2, 3)), (1, 2, (2, 3)), (3, 4, (0, 1, 2, 3))]
    assert p[0].subgroups() == [(0, 1), (2, 3)]
    assert p[0].reductions_per_step(0) == 8  # two per stage
    assert p[0].describe()["kind"] == "hybrid"
    cqil = [Placement.build(r, 2, args, CQILConfig(groups=PAIRS)) for r in range(2)]
    assert cqil[1].local_stages == [(0,), (2,), (4,), (5,)] and cqil[0].reductions_per_step(1) == 4
    tp = Placement.build(0, 2, args, CQILConfig(), tensor_parallel=True)
    assert tp.reductions_per_step(0) == 2 * LAYERS and tp.describe()["kind"] == "tensor parallel"
    assert tp.subgroups() == []


@pytest.mark.parametrize("record", sorted(Path(__file__).parents[1].glob("benchmarks/results/estimate_*.json")),
                         ids=lambda path: path.stem)
def test_the_estimate_records_count_the_reductions_placement_makes(record):
    """The one-GPU estimates in benchmarks/results add each placement's reductions per decode step: they
    must be the ones Placement makes for the shape, world and groups the record names (a change of the
    placements makes the records stale)."""
    import json
    import re

    from conftest import import_benchmark

    from cqil_kernels.bench import shape_args
    from cqil_kernels.demo import parse_groups

    estimate = import_benchmark("placement_estimate")
    rec = json.loads(record.read_text())
    command = rec["command"]
    shape, world = re.search(r"--shape (\S+)", command)[1], int(re.search(r"--world (\d+)", command)[1])
    split = re.search(r"--split-groups (\S+)", command)
    chosen = estimate.placements(world, parse_groups(re.search(r"--groups (\S+)", command)[1]),
                                 parse_groups(split[1]) if split else None)
    rows = {row[0]: row for row in rec["rows"]}
    assert set(rows) == {"one-gpu", *chosen}
    for name, (cqil, tp) in chosen.items():
        counts = {Placement.build(r, world, shape_args(shape), cqil, tensor_parallel=tp).reductions_per_step(0)
                  for r in range(world)}
        assert counts == {rows[name][2]}, name  # every rank makes the same number
        assert rows[name][4] == pytest.approx(rows[name][3] + rows[name][2] * float(
            re.search(r"--reduce-us (\S+)", command)[1]) / 1000, abs=1e-3)


# a small config of the llama-3.2-1b shape for placements_e2e.py's --config (8 heads, 2 key/value heads, F 88)
SMALL = dict(num_hidden_layers=6, hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
             intermediate_size=88, vocab_size=97)


@pytest.mark.parametrize("world, groups", [(2, ["--groups", "1-5:2"]),
                                           (4, ["--groups", "1-5:4", "--split-groups", "1-5:2"])], ids=["w2", "w4"])
def test_the_placements_benchmark_runs_every_placement_on_cpu_ranks(tmp_path, world, groups):
    """benchmarks/placements_e2e.py, the several-GPU comparison, end to end on CPU ranks under torchrun
    (gloo, torch backend, a small config): every placement gives the one-GPU model's last logits and greedy
    tokens, reports the reductions Placement makes and every rank's bytes. Its CPU timings mean nothing."""
    import json
    import os
    import subprocess
    import sys

    from cqil_kernels.bench import shape_args
    from cqil_kernels.demo import parse_groups

    out = tmp_path / "placements.json"
    config = [arg for key, value in SMALL.items() for arg in ("--config", f"{key}={value}")]
    script = Path(__file__).parents[1] / "benchmarks" / "placements_e2e.py"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
                          str(script), "--shape", "llama-3.2-1b", *config, *groups, "--backend", "torch",
                          "--dtype", "float32", "--prompt", "8", "--new", "6", "--greedy", "4", "--rounds", "1",
                          "--out", str(out)],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(out.read_text())
    args = shape_args("llama-3.2-1b", **SMALL)
    wanted = {"tp": (CQILConfig(), True), "cqil": (parse_groups(groups[1]), False),
              "hybrid": (parse_groups(groups[1]), True)}
    if world == 4:
        wanted["hybrid-split"] = (parse_groups(groups[3]), True)
    rows = {row[0]: row for row in record["rows"]}
    assert set(rows) == {"one-gpu", *wanted}
    for name, (cqil, tp) in wanted.items():
        check = record["checks"][name]
        assert check["greedy_tokens_identical"] is True and rows[name][5] is True, name
        assert check["logits_max_abs_diff"] <= 1e-5 * check["logits_scale"], name
        assert rows[name][2] == record["per_rank"][name]["reductions_per_step"] == \
            Placement.build(0, world, args, cqil, tensor_parallel=tp).reductions_per_step(0), name
        ranks = record["per_rank"][name]["ranks"]
        assert len(ranks) == world and all(r["parameter_bytes"] > 0 and r["kv_cache_bytes"] > 0 for r in ranks)


@pytest.mark.parametrize("overrides, world, cqil, message", [
    (dict(num_attention_heads=6, num_key_value_heads=2), 4, CQILConfig(), "6 attention heads do not divide by 4"),
    (dict(intermediate_size=90), 4, CQILConfig(), "intermediate size 90 does not divide by 4"),
    (dict(num_attention_heads=12, num_key_value_heads=3), 4, CQILConfig(),
     "3 key/value heads neither divide by 4 nor divide 4"),
    ({}, 4, CQILConfig(groups=((1, 2, 3),)), r"group \[1, 2, 3\] has 3 layers, which does not divide the 4 ranks"),
])
def test_placements_that_cannot_split_are_refused(overrides, world, cqil, message):
    with pytest.raises(ValueError, match=message):
        Placement.build(0, world, _args(**overrides), cqil, tensor_parallel=True)


def test_bad_tensor_parallel_requests_are_refused_before_any_process_starts(checkpoint, tmp_path):
    import multiprocessing

    start = time.monotonic()
    before = len(multiprocessing.active_children())
    with pytest.raises(ValueError, match="needs several devices"):
        CQILLlama.from_pretrained(checkpoint, device="cpu", tensor_parallel=True)
    with pytest.raises(ValueError, match="at least 2 entries"):
        CQILLlama.from_pretrained(checkpoint, devices=["cpu"], tensor_parallel=True)
    with pytest.raises(ValueError, match="'p2p' is not supported with tensor_parallel=True"):
        CQILLlama.from_pretrained(checkpoint, cqil=CQILConfig(groups=PAIRS, bypass=1), devices=["cpu"] * 2,
                                  tensor_parallel=True, bypass_exchange="p2p")
    with pytest.raises(ValueError, match="does not divide the 4 ranks"):
        CQILLlama.from_pretrained(checkpoint, cqil=CQILConfig(groups=((1, 2, 3),)), devices=["cpu"] * 4,
                                  tensor_parallel=True)
    odd = tmp_path / "odd"
    random_hf_model(seed=7, **{**SHAPE, "intermediate_size": 90}).save_pretrained(odd)
    with pytest.raises(ValueError, match="intermediate size 90 does not divide by 4"):
        CQILLlama.from_pretrained(odd, devices=["cpu"] * 4, tensor_parallel=True)
    with pytest.raises(TypeError, match="tensor_parallel must be True or False"):
        CQILLlama.from_pretrained(checkpoint, devices=["cpu"] * 2, tensor_parallel="yes")
    assert len(multiprocessing.active_children()) == before and time.monotonic() - start < 30


def _rank_graph_policy(backend: str, one_shot: bool, max_bytes: int = 8 << 20):
    """A stand-in RankModel for its graph policy alone: ranks on CUDA with the Triton backend, hidden 1024,
    bf16, one group of 2 layers, the reductions through `backend` (one-shot kernel enabled or not)."""
    from types import SimpleNamespace

    from cqil_kernels.parallel import RankModel
    from cqil_kernels.parallel.comm import PeerPathPolicy

    policy = PeerPathPolicy("one-shot", one_shot, "" if one_shot else "cqil_kernels._C could not be imported",
                            max_bytes)
    rank = SimpleNamespace(reducer=SimpleNamespace(backend=backend, one_shot_policy=policy),
                           placement=SimpleNamespace(stages=[(0,), (1, 2), (3,)]),
                           args=SimpleNamespace(hidden_size=1024), dtype=torch.bfloat16,
                           microbatch_span=lambda B, T: None, cuda_graphs=True, device=torch.device("cuda"),
                           model=SimpleNamespace(cqil=CQILConfig(groups=((1, 2),)), accelerated=lambda: True),
                           bypass_exchange="all_reduce")
    rank._step_capturable = lambda B, rows: RankModel._step_capturable(rank, B, rows)
    return lambda batch: RankModel.decodes_in_a_graph(rank, batch)


def test_a_rank_decodes_in_a_graph_only_where_its_reductions_can_be_captured():
    # found on a GPU: ranks sharing one GPU without the one-shot kernel (an extension not built) captured a
    # gloo all-reduce, and the capture failed with a CUDA error instead of decoding eagerly
    assert _rank_graph_policy("nccl", one_shot=False)(32)
    assert not _rank_graph_policy("gloo", one_shot=False)(1)
    decodes = _rank_graph_policy("gloo", one_shot=True, max_bytes=64 << 10)  # 2 x B rows x 1024 x 2 bytes
    assert decodes(1) and decodes(16) and not decodes(17)
