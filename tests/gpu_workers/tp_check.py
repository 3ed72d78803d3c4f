"""Tensor-parallel and hybrid placements on the GPU (tests/test_parallel_cuda.py runs this under torchrun):
every rank on GPU 0 when one GPU is lent (gloo for torch.distributed, our reductions through CUDA IPC on
that device), or one GPU per rank.

    torchrun --standalone --nproc-per-node N tests/gpu_workers/tp_check.py CHECKPOINT one_gpu|gpus

For each placement, the ranks' bf16 logits of a left-padded prompt (its third call replayed from the
prompt's CUDA graph, bit for bit the first, eager, call's) and of 8 decode steps (replayed from a CUDA
graph, reductions included) must be within twice the one-process bf16 model's error against a float32
model of the same weights (plus one bf16 unit at the logits' scale). Rank 0 prints "tp check OK <case>".
"""

import sys

import torch
import torch.distributed as dist

from cqil_kernels import CQILConfig, CQILLlama
from cqil_kernels.parallel import RankModel, end_rank, init_from_env

PAIRS = ((1, 2), (3, 4))


def cases(world: int) -> dict:
    out = {"tp": CQILConfig(), "hybrid": CQILConfig(groups=PAIRS if world == 2 else ((1, 2, 3, 4),))}
    if world == 4:
        out["P2xTP2-d1"] = CQILConfig(groups=PAIRS, bypass=1)
    return out


def check(src: str, name: str, cqil: CQILConfig, device: torch.device) -> None:
    rank = dist.get_rank()
    ranked = RankModel.from_pretrained(src, cqil, device=device, dtype=torch.bfloat16, tensor_parallel=True)
    one = CQILLlama.from_pretrained(src, cqil=cqil, device=device, dtype=torch.bfloat16)
    exact = CQILLlama.from_pretrained(src, cqil=cqil, device=device, dtype=torch.float32)
    exact.backend = "torch"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, one.args.vocab_size, (2, 13), generator=g).to(device)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    steps = torch.randint(0, one.args.vocab_size, (8, 2), generator=g).to(device)
    logits = {}
    for label, model in (("ranks", ranked), ("one", one), ("exact", exact)):
        with torch.inference_mode():
            firsts = []
            for _ in range(3 if label == "ranks" else 1):  # the ranks' prompt: eager padded, captured, replayed
                cache = model.new_cache(2, 24)
                firsts.append(model(ids, mask, cache=cache)[:, -1].double())
            outs = [firsts[-1]]
            decode = model.decoder(cache)
            outs += [decode(tok).double().clone() for tok in steps]
        logits[label] = torch.stack(outs)
        if label == "ranks":
            why = model.reducer.one_shot_policy.reason or "enabled"
            assert getattr(decode, "graph", None) is not None, f"the decode is no graph replay (one-shot: {why})"
            assert model._graphs is not None and model._graphs.captured() == 1, "the ranks' prompt is not replayed"
            assert all(torch.equal(first, firsts[0]) for first in firsts[1:]), "replayed prompt logits differ"
    err_ranks = (logits["ranks"] - logits["exact"]).abs().max().item()
    err_one = (logits["one"] - logits["exact"]).abs().max().item()
    scale = logits["exact"].abs().max().item()
    limit = 2 * err_one + torch.finfo(torch.bfloat16).eps * scale
    assert err_ranks <= limit, f"{name}: ranks' error {err_ranks:.4g} > {limit:.4g} (one GPU's {err_one:.4g})"
    ranked.reducer.check_health()
    paths = ranked.stats()["reductions"]
    assert paths["one_shot"] > 0, paths
    if rank == 0:
        print(f"tp check OK {name}: error {err_ranks:.4g} vs one GPU {err_one:.4g}, reductions {paths}", flush=True)


def main() -> None:
    src, where = sys.argv[1], sys.argv[2]
    if where == "one_gpu":
        init_from_env(backend="gloo")
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    else:
        device = init_from_env()
    for name, cqil in cases(dist.get_world_size()).items():
        check(src, name, cqil, device)
    end_rank()


if __name__ == "__main__":
    main()
