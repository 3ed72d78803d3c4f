"""Generate text with a LLaMA checkpoint, with or without a CQIL grouping.

    python python/generate.py path/to/model.gguf --prompt "Hello" --groups 12-16:2
    python python/generate.py path/to/hf-dir --tokenizer path/to/hf-dir --prompt "Hello"

Several GPUs (rank r runs layer r of every group), either launched by torchrun (SPMD; rank 0 prints):
    torchrun --nproc-per-node 2 python/generate.py path/to/model.gguf --groups 12-30:2
or started from this one process:
    python python/generate.py path/to/model.gguf --groups 12-30:2 --devices 0,1      (cpu,cpu: gloo)

A .gguf file carries its tokenizer; a Hugging Face directory usually does too (--tokenizer defaults to
the model path).
"""

import argparse
import os
from pathlib import Path

import torch
from transformers import AutoTokenizer

from cqil_kernels import CQILConfig, CQILLlama
from cqil_kernels.demo import parse_groups, timed_generate


def main() -> None:
    from cqil_kernels.parallel.rank import BYPASS_EXCHANGES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("model", type=Path, help="HF directory or .gguf file")
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--groups", default=None, help="e.g. 12-16:2 or '12,13;14,15' (default: none)")
    parser.add_argument("--bypass", type=int, default=0)
    parser.add_argument("--bypass-exchange", default="all_reduce", choices=BYPASS_EXCHANGES,
                        help="several ranks with --bypass: point-to-point sends (decode eager) or one "
                             "all-reduce per group (decode in a CUDA graph)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--sample", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--devices", default=None, help="e.g. 0,1 or cpu,cpu: one rank process per device")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tensor-parallel", action="store_true",
                        help="split layers over the ranks too: pure TP without --groups, else the hybrid")
    args = parser.parse_args()

    cqil = parse_groups(args.groups, args.bypass) if args.groups else CQILConfig()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    torchrun = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if torchrun:  # SPMD: this process is one rank
        from cqil_kernels.parallel import RankModel, init_from_env

        device = init_from_env(backend="gloo" if args.device == "cpu" else None)
        model = RankModel.from_pretrained(args.model, cqil, device=device, dtype=dtype,
                                          bypass_exchange=args.bypass_exchange, tensor_parallel=args.tensor_parallel)
    elif args.devices:
        devices = [int(d) if d.isdigit() else d for d in args.devices.split(",")]
        model = CQILLlama.from_pretrained(args.model, cqil=cqil, devices=devices, dtype=dtype,
                                          bypass_exchange=args.bypass_exchange, tensor_parallel=args.tensor_parallel)
    else:
        model = CQILLlama.from_pretrained(args.model, cqil=cqil, device=args.device, dtype=dtype, progress=True)
    if args.model.suffix == ".gguf":
        tokenizer = AutoTokenizer.from_pretrained(str(args.model.parent), gguf_file=args.model.name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer or args.model))
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    try:
        run = timed_generate(model, ids, args.max_new_tokens, tokenizer.eos_token_id, do_sample=args.sample,
                             seed=args.seed if args.sample else None)
    finally:
        if args.devices and not torchrun:
            model.close()
    if not torchrun or int(os.environ["RANK"]) == 0:
        print(tokenizer.decode(run.tokens[0], skip_special_tokens=True))
        where = f" on {os.environ['WORLD_SIZE']} ranks" if torchrun else (f" on {args.devices}" if args.devices else "")
        print(f"\n{model.cqil}{where}: {run.new_tokens} tokens in {run.seconds:.2f} s "
              f"({run.ms_per_token:.1f} ms/token)")
    if torchrun:
        from cqil_kernels.parallel import end_rank

        end_rank()


if __name__ == "__main__":
    main()
