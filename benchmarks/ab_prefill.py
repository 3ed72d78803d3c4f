"""Same-process A/B of prefill settings of cqil_kernels/envs.py (CQIL_PREFILL_BLAS_ROWS, ...),
set up as `cqil bench` sets up: an HF model with random weights, ours converted from it, each timing a
CUDA-graph decode before its prefills (`bench._time_ours`), HF eager optionally in the same rounds.
Variants and groupings alternate round by round, the order reversed every other round.

    python benchmarks/ab_prefill.py --shape llama-7b --hf --prompt 512 --prompt 128 \\
        --variant kernels:CQIL_PREFILL_BLAS_ROWS=0 --variant blas:CQIL_PREFILL_BLAS_ROWS=1 --out ab.json

A variant is NAME:VAR=VALUE[,VAR=VALUE...] (as in ab_decode.py); each runs sequential and with the
shape's CQIL groups (--groups). Prefill ms = median of CUDA-event timings of new_cache + forward.
"""

from __future__ import annotations

import json
import statistics

import torch

from ab_decode import ab_parser, settings


def main(argv=None) -> None:
    from cqil_kernels import CQILConfig, CQILLlama
    from cqil_kernels.bench import DEFAULT_GROUPS, _commit, _time_hf, _time_ours, _warm_up_gpu, random_hf_model
    from cqil_kernels.demo import parse_groups

    ap = ab_parser(__doc__, shape="llama-7b", rounds=2, groups_help="CQIL groups (default: the shape's)")
    ap.add_argument("--prompt", action="append", type=int, help="prompt lengths (default 512)")
    ap.add_argument("--hf", action="store_true", help="time HF eager in the same rounds")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("ab_prefill measures GPU latency and needs a CUDA device")
    prompts = a.prompt or [512]
    if min(prompts) < 1 or a.rounds < 1:
        raise SystemExit("prompts and rounds must be >= 1")
    device = torch.device("cuda")
    hf = random_hf_model(a.shape, torch.bfloat16, device)
    model = CQILLlama.from_pretrained(hf)
    groups = a.groups or DEFAULT_GROUPS[a.shape]
    cqil = parse_groups(groups)
    ids = torch.randint(0, model.args.vocab_size, (1, max(prompts)), device=device)
    runs_to_do = [("hf-eager", None, None)] if a.hf else []
    runs_to_do += [(f"{name}-{kind}", env, kind) for name, env in a.variant for kind in ("seq", "cqil")]
    _warm_up_gpu(device, 2.0)
    runs: dict[str, list[list[float]]] = {}
    for prompt in prompts:
        for r in range(a.rounds):
            for name, env, kind in (runs_to_do if r % 2 == 0 else runs_to_do[::-1]):
                if kind is None:
                    prefill_ms, decode_ms = _time_hf(hf, ids[:, :prompt], 64, 1)
                else:
                    model.cqil = CQILConfig() if kind == "seq" else cqil
                    with settings(env), torch.inference_mode():
                        prefill_ms, decode_ms = _time_ours(model, ids[:, :prompt], 64, 1)
                runs.setdefault(f"{name}@{prompt}", []).append([round(prefill_ms, 3), round(decode_ms, 4)])
                print(f"prompt {prompt} round {r} {name:>16}: prefill {prefill_ms:8.3f} ms   "
                      f"decode {decode_ms:.4f} ms/token", flush=True)
    record = dict(card=torch.cuda.get_device_name(), commit=_commit(), shape=a.shape, groups=groups,
                  variants={name: env for name, env in a.variant},
                  results={k: dict(prefill_median_ms=statistics.median(p for p, _ in v),
                                   decode_median_ms=statistics.median(d for _, d in v), runs=v)
                           for k, v in runs.items()})
    print(json.dumps(record["results"], indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
