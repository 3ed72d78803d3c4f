"""Summarise a pytest-benchmark JSON of the kernel comparisons as a markdown table.

    python benchmarks/summarize.py results.json > table.md
Pairs each fused benchmark with its torch twin (same parameters) and prints us/call, GB/s, speedup.
"""

import json
import re
import sys


def main(path: str) -> None:
    data = json.load(open(path))
    rows = {}
    for b in data["benchmarks"]:
        params = dict(b["params"])
        impl = params.pop("impl")
        key = (b["name"].split("[")[0], tuple(sorted(params.items())))
        rows.setdefault(key, {})[impl] = b["extra_info"]
    first = data["benchmarks"][0]["extra_info"] if data["benchmarks"] else {}
    print(f"card: {first.get('card', '?')}; commit {first.get('commit', '?')}; "
          f"date {data.get('datetime', '?')[:16]}; per call: median of CUDA-graph replays\n")
    print("| op | shape | P | T | other | fused µs | torch µs | speedup | fused GB/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (name, params), impls in sorted(rows.items()):
        p = dict(params)
        f, t = impls.get("fused"), impls.get("torch")
        if not f or not t:
            continue
        op = re.sub(r"^test_", "", name)
        other = ", ".join(f"{k}={v}" for k, v in p.items() if k not in ("shape", "P", "T")) or "-"
        print(f"| {op} | {p['shape']} | {p.get('P', '-')} | {p.get('T', '-')} | {other} | {f['us_per_call']:.1f} | "
              f"{t['us_per_call']:.1f} | {t['us_per_call'] / f['us_per_call']:.2f}x | {f['gbps']:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1])
