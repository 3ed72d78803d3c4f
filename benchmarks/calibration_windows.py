"""How many windows a calibration budget needs: the paired bootstrap interval of a grouping's perplexity
increase (quality.paired_bootstrap) against the number of windows it is measured on, per text.

    python benchmarks/calibration_windows.py MODEL --groups 15,16 --text jargon.txt --text docs.txt \\
        --window 256 --windows 64 --out windows.json

For each text, the original model and the grouping score the same `--windows` windows (spread evenly
over the text); then, for W = 4, 8, 16, ... up to all of them, the interval (90%, 2000 resamples, seed 0)
over the first W windows (a stretch of the text, as a shorter text gives) and over W windows spread over
the text; with several texts, also all of them mixed (W spread windows of each, pooled). Also the spread
of single windows' increases, which is what deciding on one or two windows sees. Writes a record (card,
date, commit, command, rows).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from cqil_kernels import CQILConfig, CQILLlama
from cqil_kernels.bench import _commit, write_record
from cqil_kernels.demo import parse_groups
from cqil_kernels.quality import ReferenceRun, paired_bootstrap, read_token_ids


@torch.inference_mode()
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--groups", required=True, help="the grouping, as `cqil demo --groups` reads it")
    ap.add_argument("--text", action="append", required=True, help="a text file (repeat for several)")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    commit = _commit()  # the code this run loads (a later commit may land while it runs)
    cqil = parse_groups(a.groups)
    model = CQILLlama.from_pretrained(a.model, cqil=CQILConfig(), device=a.device,
                                      dtype=torch.float32 if a.device in (None, "cpu") else None)
    rows, per_text = [], []
    for text in a.text:
        ids = read_token_ids(text, a.model)
        stride = max(a.window, (ids.numel() - a.window) // max(1, a.windows - 1))
        chosen = torch.cat([ids[s:s + a.window] for s in range(0, ids.numel() - a.window + 1, stride)][:a.windows])
        reference = ReferenceRun(model, chosen, window=a.window)
        base_nll, new_nll, tokens = reference.window_nll, reference.grouped_window_nll(cqil), reference.window_tokens
        per_text.append((base_nll, new_nll, tokens))
        singles = [math.exp((n - b) / t) - 1 for n, b, t in zip(new_nll.tolist(), base_nll.tolist(), tokens.tolist())]
        W = len(singles)
        sizes = sorted({w for w in (4, 8, 16, 32, 64, 128, W) if w <= W})
        for w in sizes:
            # "first": the first w windows, a stretch of the text as a shorter text would give;
            # "spread": w windows spread over the whole text
            for how, pick in (("first", torch.arange(w)), ("spread", torch.linspace(0, W - 1, w).round().long())):
                if how == "spread" and w == W:
                    continue
                b, n, t = base_nll[pick], new_nll[pick], tokens[pick]
                low, high = paired_bootstrap(b, n, t, seed=0)
                point = math.exp((n.sum() - b.sum()).item() / t.sum().item()) - 1
                rows.append([Path(text).name, w, how if w < W else "all", round(100 * point, 2),
                             round(100 * low, 2), round(100 * high, 2), round(100 * (high - low), 2)])
                print(f"{Path(text).name}: {w:>3} windows ({how:>6}): {100 * point:+.2f}% "
                      f"[{100 * low:+.2f}, {100 * high:+.2f}]", flush=True)
        singles.sort()
        print(f"{Path(text).name}: single windows {100 * singles[0]:+.1f}% .. {100 * singles[-1]:+.1f}% "
              f"(median {100 * singles[W // 2]:+.1f}%)", flush=True)
        rows.append([Path(text).name, 1, "each", f"median {100 * singles[W // 2]:+.1f}",
                     f"min {100 * singles[0]:+.1f}", f"max {100 * singles[-1]:+.1f}", None])
    if len(per_text) > 1:  # the texts mixed: w windows spread over each, pooled
        for w in sorted({w for w in (4, 8, 16, 32, 64) if all(w <= p[0].numel() for p in per_text)}):
            picks = [torch.linspace(0, p[0].numel() - 1, w).round().long() for p in per_text]
            b, n, t = (torch.cat([p[i][k] for p, k in zip(per_text, picks)]) for i in range(3))
            low, high = paired_bootstrap(b, n, t, seed=0)
            point = math.exp((n.sum() - b.sum()).item() / t.sum().item()) - 1
            rows.append(["mixed", len(per_text) * w, f"{w} spread per text", round(100 * point, 2),
                         round(100 * low, 2), round(100 * high, 2), round(100 * (high - low), 2)])
            print(f"mixed: {len(per_text) * w:>3} windows: {100 * point:+.2f}% [{100 * low:+.2f}, {100 * high:+.2f}]",
                  flush=True)
    write_record(a.out, device=model.device, commit=commit,
                 title=f"Perplexity increase of {a.groups} and its 90% interval, by windows",
                 what=f"{Path(a.model).name}, fp32, windows of {a.window} tokens spread over each text, paired "
                      f"bootstrap (2000 resamples, seed 0)",
                 columns=["text", "windows", "which", "increase %", "low %", "high %", "width (points)"], rows=rows)


if __name__ == "__main__":
    main()
