"""Draw the tables the docs quote from the records in benchmarks/results/ (one JSON file per figure).

    python benchmarks/tables.py                       # every record, as Markdown
    python benchmarks/tables.py parallel_decode_6406c03 reductions

A record holds: title, what (the conditions in one line), columns, rows, and the card, date, commit and
command that produced it, either for the whole record or as columns of each row ("per row"), plus
source: where its raw files were when they were last in the tree (`git show <commit>:benchmarks/results/..`).
A `cqil bench --out` JSON is a record too (its results are drawn as rows).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
META = ("card", "date", "commit", "command")


def load(name: str | Path) -> dict:
    path = Path(name)
    if not path.suffix:
        path = RESULTS / f"{name}.json"
    record = json.loads(path.read_text())
    if "results" in record and "decode_step_bytes" in record:  # a `cqil bench` record
        record = bench_record(record)
    check(record, path.name)
    return record


def bench_record(bench: dict) -> dict:
    """A `cqil bench --out` JSON as a table record."""
    rows = [[bench["shape"], variant, r["decode_ms_per_token"], r["decode_pct_of_copy"], r["prefill_ms"],
             r.get("prefill_loaded_device_ms"), r.get("prefill_rested_ms"), r.get("prefill_eager_ms"),
             r.get("prefill_device_ms"), r.get("ttft_ms")]
            for variant, r in bench["results"].items()]
    cut = f"; cut short before {', '.join(bench['pending'])}" if bench.get("pending") else ""
    return dict(title=f"cqil bench, {bench['shape']}", what=(
        f"{bench['dtype']}, batch {bench['batch']}, {bench['prompt']}-token prompt, {bench['new_tokens']} new tokens, "
        f"CQIL groups {bench['groups']}, copy {bench['copy_gbps']} GB/s{cut}"),
        columns=["shape", "variant", "decode ms/token", "% of copy", "prefill ms", "prefill ms (device, under load)",
                 "prefill ms (rested)",
                 "prefill ms (graphs off)",
                 "prefill ms (device)", "first token ms"],
        rows=rows, source="this file", **{k: bench[k] for k in META})


def check(record: dict, name: str) -> None:
    """ValueError unless every row says its card, date, commit and command (record-wide or per row)."""
    for key in ("title", "what", "columns", "rows", "source"):
        if key not in record:
            raise ValueError(f"{name}: a record needs {key!r}")
    for key in META:
        if record.get(key) in (None, "", "per row") and key not in record["columns"]:
            raise ValueError(f"{name}: no {key} for the record or its rows")
    for row in record["rows"]:
        if len(row) != len(record["columns"]):
            raise ValueError(f"{name}: row {row} does not have the {len(record['columns'])} columns")


def markdown(record: dict) -> str:
    def cell(value) -> str:
        return "-" if value is None else str(value)

    lines = [f"**{record['title']}** ({record['what']})", "",
             "| " + " | ".join(record["columns"]) + " |", "|" + "---|" * len(record["columns"])]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in record["rows"]]
    meta = [f"{k}: {record[k]}" for k in META if record.get(k) not in (None, "per row")]
    lines += ["", "; ".join(meta + [f"source: {record['source']}"])]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("records", nargs="*", help="record names (default: every JSON in benchmarks/results)")
    args = ap.parse_args(argv)
    names = args.records or sorted(RESULTS.glob("*.json"))
    print("\n\n".join(markdown(load(name)) for name in names))


if __name__ == "__main__":
    main()
