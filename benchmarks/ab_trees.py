"""Two builds of the package on one machine, in one run: a benchmark script run alternately with each, so that
a change to host time is measured against its baseline on the same host (host times differ by half from one
machine of the same card to another: benchmarks/results/host_parts_smollm2_h100_d1a3c1f.json).

    python benchmarks/ab_trees.py --old /tmp/ab_old --old-name 5744672 --rounds 3 --out ab.json \\
        -- --shape smollm2-135m --rows 64 --rows 512 --variant base:

--old: a folder holding another build of cqil_kernels (e.g. `CQIL_SKIP_EXTENSION=1 pip install --no-deps
--target /tmp/ab_old <an older tree>`), put first on PYTHONPATH for its runs; the other runs import the
installed package. The arguments after `--` go to benchmarks/prefill_rows.py (--script: another script that
writes such a record), run once per build and round with --rounds 1, the builds' order reversed every other
round. Rows: the script's rows with the build's name in front; the numeric cells are medians over the rounds.
`paired`: the rounds compared pairwise (for each row and numeric column, in how many rounds this build was
lower, and the median of the rounds' differences), steadier on a host whose speed drifts between rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_script(script: Path, args: list[str], out: Path, pythonpath: str | None) -> dict:
    """One run of `script` with `args` and --rounds 1 --out `out` (pythonpath first on PYTHONPATH); its record."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    subprocess.run([sys.executable, str(script), *args, "--rounds", "1", "--out", str(out)], env=env, check=True)
    return json.loads(out.read_text())


def merge(records: dict[str, list[dict]]) -> tuple[list[str], list[list]]:
    """(columns, rows) from each build's records (one a round): the build's name, then each row of the script's
    record with its numeric cells replaced by their median over the rounds (rows matched by their other cells)."""
    columns = None
    rows = []
    for name, runs in records.items():
        for record in runs:
            if columns is None:
                columns = record["columns"]
            elif record["columns"] != columns:
                raise ValueError(f"{name}: the runs' columns differ ({record['columns']} against {columns})")
        keyed: dict[tuple, list[list]] = {}
        for record in runs:
            for row in record["rows"]:
                keyed.setdefault(_key(row), []).append(row)
        for same in keyed.values():
            merged = [round(statistics.median(cells), 3) if isinstance(cells[0], float) else cells[0]
                      for cells in zip(*same)]
            rows.append([name, *merged])
    return ["build", *(columns or [])], rows


def paired(records: dict[str, list[dict]], old: str, new: str) -> tuple[list[str], list[list]]:
    """(columns, rows) of the rounds compared pairwise: the two builds' runs of one round ran next to each other,
    so on a host whose speed drifts between rounds their difference is steadier than the difference of the
    medians. For each row of the script's record (named by its non-numeric cells, as merge matches them) and
    each numeric column: the rounds in which `new` was lower, the rounds, and the median of new - old."""
    columns = records[old][0]["columns"]
    diffs: dict[tuple[str, str], list[float]] = {}
    for old_run, new_run in zip(records[old], records[new]):
        by_key = {_key(row): row for row in new_run["rows"]}
        for row in old_run["rows"]:
            other = by_key.get(_key(row))
            if other is None:
                raise ValueError(f"{new}: no row matches {row} of {old}'s run")
            name = " / ".join(str(cell) for cell in _key(row))
            for column, a, b in zip(columns, row, other):
                if isinstance(a, float) and isinstance(b, float):
                    diffs.setdefault((name, column), []).append(b - a)
    rows = [[name, column, sum(d < 0 for d in ds), len(ds), round(statistics.median(ds), 4)]
            for (name, column), ds in diffs.items()]
    return ["row", "column", f"rounds {new} lower", "rounds", f"median of {new} - {old}"], rows


def _key(row: list) -> tuple:
    """A script row's non-numeric cells: what names it across runs."""
    return tuple(cell for cell in row if not isinstance(cell, float))


def main(argv=None) -> None:
    import torch

    from cqil_kernels.bench import _commit, write_record

    argv = list(sys.argv[1:] if argv is None else argv)
    script_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, type=Path, help="folder holding the other build's cqil_kernels")
    ap.add_argument("--old-name", default="old")
    ap.add_argument("--new-name", default=None, help="default: this checkout's commit")
    ap.add_argument("--script", type=Path, default=HERE / "prefill_rows.py")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(own)
    if not (a.old / "cqil_kernels" / "__init__.py").is_file():
        raise SystemExit(f"--old {a.old}: no cqil_kernels package in it")
    if a.rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    new_name = a.new_name or _commit()
    builds = [(a.old_name, str(a.old)), (new_name, None)]
    records: dict[str, list[dict]] = {name: [] for name, _ in builds}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for name, path in (builds if r % 2 == 0 else builds[::-1]):
                print(f"== round {r}: {name}", flush=True)
                records[name].append(run_script(a.script, script_args, Path(tmp) / f"{name}_{r}.json", path))
    columns, rows = merge(records)
    pair_columns, pair_rows = paired(records, a.old_name, new_name)
    first = records[new_name][0]
    write_record(a.out, device=torch.device("cuda" if torch.cuda.is_available() else "cpu"), commit=new_name,
                 title=f"{first.get('title', a.script.name)}: {a.old_name} against {new_name}, same machine",
                 what=f"{a.script.name} {' '.join(script_args)}, run alternately with each build ({a.rounds} rounds, "
                      f"order reversed every other round, one process each), medians over the rounds; "
                      f"{a.old_name} imported from another build of the package ({a.old})",
                 columns=columns, rows=rows, paired_columns=pair_columns, paired=pair_rows)
    for row in rows:
        print(" ".join(str(cell) for cell in row))
    print(" | ".join(pair_columns))
    for row in pair_rows:
        print(" ".join(str(cell) for cell in row))


if __name__ == "__main__":
    main()
