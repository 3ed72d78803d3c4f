"""The `cqil` command (also `python -m cqil_kernels`)."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(prompt=args.prompt, groups=args.groups, bypass=args.bypass, bypass_mode=args.bypass_mode,
             max_new_tokens=args.max_new_tokens, device=args.device, dtype=args.dtype, tiny=args.tiny)
    return 0


def _info(args) -> int:
    import torch

    from . import __version__, _ext

    print(f"cqil_kernels {__version__}, torch {torch.__version__}, "
          f"torch.cuda.is_available() = {torch.cuda.is_available()}")
    if not _ext.available():
        print(f"extension: unavailable: {_ext.unavailable_reason()}")
        return 0
    print(f"extension: {_ext.build_info()}")
    reason = _ext.cuda_unavailable_reason()
    print("extension CUDA part: " + ("usable" if reason is None else f"not usable here: {reason}"))
    return 0


def _bench(args) -> int:
    import json

    from . import bench

    if args.plot:
        for path in args.plot:
            record = json.loads(open(path).read())
            bench.plot(record, path.rsplit(".", 1)[0] + ".png")
        return 0
    command = "cqil bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "cqil bench"
    record = bench.run_bench(shape=args.shape, groups=args.groups, batch=args.batch, prompt=args.prompt,
                             new=args.new_tokens, dtype=args.dtype, repeats=args.repeats,
                             variants=tuple(args.variants.split(",")), command=command)
    for path in bench.write(record, args.out or f"bench_{args.shape}_b{args.batch}.json"):
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .demo import DEFAULT_GROUPS, DEFAULT_PROMPT

    parser = argparse.ArgumentParser(prog="cqil", description="CQIL inference for LLaMA models")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="original vs CQIL-grouped generation on SmolLM2-135M-Instruct")
    demo.add_argument("--prompt", default=DEFAULT_PROMPT)
    demo.add_argument("--groups", default=DEFAULT_GROUPS,
                      help="START-END:P (groups of P over [START, END)) or '12,13;14,15' "
                           f"(default {DEFAULT_GROUPS})")
    demo.add_argument("--bypass", type=int, default=0, help="bypass distance d (default 0)")
    demo.add_argument("--bypass-mode", choices=["residual", "mlp_input"], default="residual")
    demo.add_argument("--max-new-tokens", type=int, default=48)
    demo.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    demo.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                      help="default: bfloat16 on cuda, float32 on cpu")
    demo.add_argument("--tiny", action="store_true", help="use a tiny random model (no download needed)")
    demo.set_defaults(func=_demo)

    from .bench import DEFAULT_GROUPS as BENCH_GROUPS, SHAPES, VARIANTS

    bench = sub.add_parser("bench", help="end-to-end prefill/decode latency on the GPU: transformers "
                                         "eager vs ours (torch, Triton sequential, Triton CQIL)")
    bench.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m",
                       help="published config, random weights (default smollm2-135m)")
    bench.add_argument("--groups", default=None,
                       help=f"CQIL groups as in `cqil demo` (default per shape: {BENCH_GROUPS})")
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--prompt", type=int, default=512, help="prompt tokens (default 512)")
    bench.add_argument("--new-tokens", type=int, default=64, help="decode steps timed (default 64)")
    bench.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    bench.add_argument("--repeats", type=int, default=5, help="runs per figure; the median is kept")
    bench.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    bench.add_argument("--out", default=None, help="JSON path (a PNG is written beside it)")
    bench.add_argument("--plot", nargs="+", metavar="JSON", help="only (re)draw the PNG of saved results")
    bench.set_defaults(func=_bench)

    info = sub.add_parser("info", help="versions, and whether the compiled extension and CUDA are usable")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        print(f"cqil {args.command}: error: {e}", file=sys.stderr)
        return 2
