"""Where the Triton backend's prefill time goes, per prompt length: wall (host and device together, as a
user's `model(ids, cache=...)` runs: on CUDA replayed from the length bucket's CUDA graph), eager (the same
with the prefill graphs off) and device only (the step queued behind a GPU sleep, so the host's launch
time is hidden). For each variant of the environment (as in ab_decode.py), sequential and with
the shape's CQIL groups. This is the measurement behind fused.use_blas' default rule.

    python benchmarks/prefill_rows.py --shape llama-7b --rows 16 --rows 64 --rows 512 \\
        --variant kernels:CQIL_PREFILL_BLAS_ROWS=0 --variant blas:CQIL_PREFILL_BLAS_ROWS=1 --out rows.json

Wall, device under load, rested wall, eager, device and host ms as cqil_kernels.bench.prefill_split_ms
measures them (device: the step queued behind a GPU sleep, at the full clock; under load: the step replayed
back to back, at the clock the wall runs at; rested: the wall after the GPU rested).
Variants and groupings alternate, order reversed every other round.
"""

from __future__ import annotations

import json
import statistics

import torch

from ab_decode import ab_parser, settings


def _median(values) -> float | None:
    """The median of the figures measured (loaded_device_ms is None where its graph did not fit), else None."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def main(argv=None) -> None:
    from cqil_kernels import CQILConfig
    from cqil_kernels.bench import (DEFAULT_GROUPS, REST_S, _commit, _warm_up_gpu, prefill_split_ms, random_model,
                                    write_record)
    from cqil_kernels.demo import parse_groups

    ap = ab_parser(__doc__, shape="llama-7b", rounds=2, groups_help="CQIL groups (default: the shape's)")
    ap.add_argument("--rows", action="append", type=int, help="prompt lengths, batch 1 (default 16 64 512)")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("prefill_rows measures GPU latency and needs a CUDA device")
    rows = a.rows or [16, 64, 512]
    if min(rows) < 1 or a.rounds < 1 or a.repeats < 1:
        raise SystemExit("rows, rounds and repeats must be >= 1")
    device, commit = torch.device("cuda"), _commit()
    model = random_model(a.shape, torch.bfloat16, device)
    groups = a.groups or DEFAULT_GROUPS[a.shape]
    configs = {"seq": CQILConfig(), "cqil": parse_groups(groups)}
    ids = torch.randint(0, model.args.vocab_size, (1, max(rows)), device=model.device)
    runs_to_do = [(name, env, kind) for name, env in a.variant for kind in configs]
    _warm_up_gpu(device, 2.0)
    results: dict[str, list[dict[str, float]]] = {}
    with torch.inference_mode():
        for T in rows:
            for name, env, kind in runs_to_do:  # compile and autotune outside the timed rounds
                model.cqil = configs[kind]
                with settings(env):
                    model(ids[:, :T], cache=model.new_cache(1, T))
            for r in range(a.rounds):
                for name, env, kind in (runs_to_do if r % 2 == 0 else runs_to_do[::-1]):
                    model.cqil = configs[kind]
                    with settings(env):
                        t = prefill_split_ms(model, ids[:, :T], a.repeats)
                    results.setdefault(f"{name}-{kind}@{T}", []).append(t)
                    print(f"rows {T:5d} round {r} {name + '-' + kind:>16}: wall {t['wall_ms']:8.3f}  "
                          f"device under load {t['loaded_device_ms'] or float('nan'):8.3f}  "
                          f"rested {t['rested_ms']:8.3f}  eager {t['eager_ms']:8.3f}  "
                          f"device {t['device_ms']:8.3f}  host {t['host_ms']:8.3f}  "
                          f"graph host {t['graph_host_ms']:8.3f} ms", flush=True)
    summary = {k: {m: _median(t[m] for t in v) for m in v[0]} for k, v in results.items()}
    print(json.dumps(summary, indent=1))
    if a.out:
        table = []
        for T in rows:
            for name, _, kind in runs_to_do:
                m = summary[f"{name}-{kind}@{T}"]
                table.append([a.shape, name, groups if kind == "cqil" else "none", T, round(m["wall_ms"], 3),
                              _round(m["loaded_device_ms"]), round(m["rested_ms"], 3), round(m["device_ms"], 3),
                              round(m["graph_host_ms"], 3), round(m["eager_ms"], 3), round(m["host_ms"], 3)])
        write_record(a.out, device=device, commit=commit,
                     title=f"Prompt wall time against its device time: {a.shape}",
                     what=(f"bf16, batch 1, random weights; wall = the graph-replayed prompt (the default on CUDA) "
                           f"including new_cache, the GPU busy before it; device under load = the step "
                           f"replayed back to back (bench.loaded_device_ms); rested = the wall after "
                           f"{REST_S} s of rest (a prompt arriving at an idle GPU: bench.prefill_split_ms); "
                           f"eager = prefill graphs off; device = the step queued behind a GPU "
                           f"sleep; host = wall time to enqueue; medians of {a.rounds} rounds of {a.repeats}, "
                           f"variants and groupings alternated"),
                     columns=["shape", "variant", "groups", "prompt tokens", "wall ms (graph)",
                              "device ms under load", "wall ms (graph, rested)", "device ms",
                              "host ms to return (graph)", "wall ms (graphs off)", "host ms (graphs off)"],
                     rows=table, variants={name: env for name, env in a.variant}, median=summary, runs=results)


if __name__ == "__main__":
    main()
