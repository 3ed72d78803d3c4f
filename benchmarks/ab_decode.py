"""Same-process A/B of decode settings (the variables of cqil_kernels/envs.py, e.g. CQIL_PDL): one model,
the variants alternated round by round (order reversed every other round) so that clock and thermal
drift hit every variant alike. Separate `cqil bench` processes on the lent H100s drifted by up to 8%
minutes apart; this is what to trust for changes of a few percent.

    python benchmarks/ab_decode.py --shape llama-7b --groups none \\
        --variant base: --variant no-pdl:CQIL_PDL=0 --rounds 4 --out ab.json

A variant is NAME:VAR=VALUE[,VAR=VALUE...] (NAME: alone = the settings as they are). Decode ms/token per
run as `cqil bench` measures it (64 greedy tokens after a 512-token prompt, CUDA graph, argmax included),
at batch 1 or --batch rows.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from cqil_kernels import envs


def parse_variant(text: str) -> tuple[str, dict]:
    """'name:A=1,B=0' -> ('name', {'A': value of 1, 'B': value of 0}), each value parsed as envs.py parses
    it; ValueError naming what is wrong."""
    name, sep, assignments = text.partition(":")
    if not sep or not name:
        raise ValueError(f"a variant is NAME:VAR=VALUE[,VAR=VALUE...] (or NAME:), got {text!r}")
    values = {}
    for item in filter(None, assignments.split(",")):
        var, eq, value = item.partition("=")
        if not eq or not var:
            raise ValueError(f"{item!r} in variant {name!r} is not VAR=VALUE")
        if var not in envs.VARIABLES:
            raise ValueError(f"{var!r} in variant {name!r} is not one of {sorted(envs.VARIABLES)}")
        values[var] = envs.parse(var, value)
    return name, values


def settings(values: dict):
    """The variant's settings for a block (envs.overridden)."""
    return envs.overridden(**values)


def ab_parser(doc: str, *, shape: str, groups_help: str, rounds: int) -> argparse.ArgumentParser:
    """The options the A/B scripts here share: --shape, --groups, --variant (repeated), --rounds, --out."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default=shape)
    ap.add_argument("--groups", default=None, help=groups_help)
    ap.add_argument("--variant", action="append", required=True, type=parse_variant)
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--out", default=None)
    return ap


def main(argv=None) -> None:
    from cqil_kernels import CQILConfig
    from cqil_kernels.bench import DEFAULT_GROUPS, _commit, _time_ours, _warm_up_gpu, random_model
    from cqil_kernels.demo import parse_groups

    ap = ab_parser(__doc__, shape="smollm2-135m", rounds=4,
                   groups_help="'none' for sequential (default: the shape's CQIL groups)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args(argv)
    if a.batch < 1 or a.prompt < 1:
        raise SystemExit(f"--batch and --prompt must be >= 1, got {a.batch} and {a.prompt}")
    if not torch.cuda.is_available():
        raise SystemExit("ab_decode measures GPU latency and needs a CUDA device")
    device = torch.device("cuda")
    model = random_model(a.shape, torch.bfloat16, device)
    groups = a.groups or DEFAULT_GROUPS[a.shape]
    model.cqil = CQILConfig() if groups == "none" else parse_groups(groups)
    ids = torch.randint(0, model.args.vocab_size, (a.batch, a.prompt), device=device)
    _warm_up_gpu(device, 2.0)
    runs: dict[str, list[float]] = {name: [] for name, _ in a.variant}
    for r in range(a.rounds):
        for name, env in (a.variant if r % 2 == 0 else a.variant[::-1]):
            with settings(env), torch.inference_mode():
                _, decode_ms = _time_ours(model, ids, 64, 3)
            runs[name].append(round(decode_ms, 4))
            print(f"round {r} {name:>16}: {decode_ms:.4f} ms/token", flush=True)
    record = dict(card=torch.cuda.get_device_name(), commit=_commit(), shape=a.shape, groups=groups, batch=a.batch,
                  variants={name: dict(settings=env, median_ms=statistics.median(runs[name]), runs=runs[name])
                            for name, env in a.variant},
                  # the table ab_trees.py merges when it runs this script with two builds
                  title=f"Decode ms/token, {a.shape}, groups {groups}, batch {a.batch}",
                  columns=["variant", "decode ms/token"],
                  rows=[[name, float(statistics.median(runs[name]))] for name, _ in a.variant])
    print(json.dumps(record, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
