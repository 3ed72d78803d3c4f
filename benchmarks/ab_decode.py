"""Same-process A/B of decode settings (the variables of cqil_kernels/envs.py, e.g. CQIL_PDL): one model,
the variants alternated round by round (order reversed every other round) so that clock and thermal
drift hit every variant alike. Separate `cqil bench` processes on the lent H100s drifted by up to 8%
minutes apart; this is what to trust for changes of a few percent.

    python benchmarks/ab_decode.py --shape llama-7b --groups none \\
        --variant base: --variant no-pdl:CQIL_PDL=0 --rounds 4 --out ab.json

A variant is NAME:VAR=VALUE[,VAR=VALUE...] (NAME: alone = the settings as they are). Decode ms/token per
run as `cqil bench` measures it (64 greedy tokens after a 512-token prompt, CUDA graph, argmax included),
at batch 1 or --batch rows. Beside envs.py's variables a variant may set GEMM_AUTOTUNED=all (or N+N+...: the
decode GEMM keys of those output widths): triton.autotune chooses those keys' configs, as it did before the
group GEMM's launcher timed decode keys itself (ops/group_gemm.py's _tune_decode); e.g. the tuner against
the autotuner on LLaMA-7B's LM head alone:

    python benchmarks/ab_decode.py --shape llama-7b --groups none --variant tuner: \
        --variant head-autotuned:GEMM_AUTOTUNED=32000 --rounds 4

Each variant keeps its own memory of the launcher's choices (group_gemm._CHOSEN), made at its first run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics

import torch

from cqil_kernels import envs


# settings of this script's own beside envs.py's (the module docstring says what GEMM_AUTOTUNED does)
BENCH_VARIABLES = ("GEMM_AUTOTUNED",)


def parse_autotuned(value: str):
    """GEMM_AUTOTUNED's value: 'all', or output widths N joined by '+' (a sorted tuple of them)."""
    if value == "all":
        return value
    try:
        widths = tuple(sorted({int(v) for v in value.split("+")}))
    except ValueError:
        widths = ()
    if not widths or min(widths) < 1:
        raise ValueError(f"GEMM_AUTOTUNED is 'all' or output widths joined by '+' (e.g. 32000+4096), got {value!r}")
    return widths


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
        if var in BENCH_VARIABLES:
            values[var] = parse_autotuned(value)
        elif var not in envs.VARIABLES:
            raise ValueError(f"{var!r} in variant {name!r} is not one of {sorted(envs.VARIABLES)} or "
                             f"{list(BENCH_VARIABLES)}")
        else:
            values[var] = envs.parse(var, value)
    return name, values


_CHOICES: dict[tuple, dict] = {}  # each variant's settings -> its memory of the group GEMM launcher's choices


@contextlib.contextmanager
def settings(values: dict):
    """The variant's settings for a block: envs.py's (envs.overridden), the launcher's choices made and kept for
    these settings alone (group_gemm._CHOSEN swapped), GEMM_AUTOTUNED's keys chosen by triton.autotune; all put
    back after."""
    from cqil_kernels.ops import group_gemm

    autotuned = values.get("GEMM_AUTOTUNED")
    # (ab_trees.py runs this script with older builds of the package too: one without the launcher's own tuning
    # takes every choice from triton.autotune already)
    tune = getattr(group_gemm, "_tune_decode", None)
    if autotuned is not None and tune is None:
        raise SystemExit("GEMM_AUTOTUNED: this build of cqil_kernels has triton.autotune choose every key already")
    if autotuned is not None and not hasattr(group_gemm, "_autotuned"):
        raise SystemExit("GEMM_AUTOTUNED: this build of cqil_kernels predates group_gemm._autotuned")
    memory = _CHOICES.setdefault(tuple(sorted((k, repr(v)) for k, v in values.items())), {})
    kept = dict(group_gemm._CHOSEN)

    def choose(key, args, grid, flags):  # key: (row class, N, K, ...)
        if autotuned != "all" and key[1] not in autotuned:
            return tune(key, args, grid, flags)
        return group_gemm._autotuned(args, grid, flags)  # _launch's path for the keys it does not time itself
    group_gemm._CHOSEN.clear()
    group_gemm._CHOSEN.update(memory)
    if autotuned is not None:
        group_gemm._tune_decode = choose
    try:
        with envs.overridden(**{k: v for k, v in values.items() if k not in BENCH_VARIABLES}):
            yield
    finally:
        memory.clear()
        memory.update(group_gemm._CHOSEN)
        if tune is not None:
            group_gemm._tune_decode = tune
        group_gemm._CHOSEN.clear()
        group_gemm._CHOSEN.update(kept)


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
