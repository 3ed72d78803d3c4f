"""Time to first token of `generate(ids, 1)` (prompt in, token on the host) with generate's kept cache taken
as it is now (DecodeSlots.take without the scan of the packed weights' bindings, which the prompt runs)
against the scan run first, as take did before de1f241: the same process, the two alternated round by round,
so that the host's speed (which differed 2x between processes of one H100 host) is the same for both.

    python benchmarks/first_token_ab.py --shape smollm2-135m --rows 64 --rows 512 --out first_token_ab.json

Per prompt length: median over --rounds of each round's median over --calls calls (bench.ttft_ms: the
device idle before each, one untimed call first), in ms, and the prompt's device time (the forward into a
kept cache, without the input check that reads the device, queued behind a GPU sleep). The "scan first"
variant wraps DecodeSlots.take to call model.packed_weights() (the scan) before it: what
graph_signature() did there.
"""

from __future__ import annotations

import argparse
import statistics

import torch


def main(argv=None) -> None:
    from cqil_kernels import graphs
    from cqil_kernels.bench import _commit, _warm_up_gpu, device_ms, random_model, ttft_ms, write_record
    from cqil_kernels.generation import generation_slot

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--rows", action="append", type=int, help="prompt lengths, batch 1 (default 64 512)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calls", type=int, default=15)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("first_token_ab measures GPU latency and needs a CUDA device")
    rows = a.rows or [64, 512]
    if min(rows) < 1 or a.rounds < 1 or a.calls < 1:
        raise SystemExit("rows, rounds and calls must be >= 1")
    device, commit = torch.device("cuda"), _commit()
    model = random_model(a.shape, torch.bfloat16, device)
    ids = torch.randint(0, model.args.vocab_size, (1, max(rows)), device=device)
    take = graphs.DecodeSlots.take

    def scan_first(self, model, batch, length):
        model.packed_weights()
        return take(self, model, batch, length)

    variants = {"deferred (now)": take, "scan first (before)": scan_first}
    _warm_up_gpu(device, 2.0)
    table = []
    try:
        for T in rows:
            prompt = ids[:, :T]
            for _ in range(3):  # the bucket eager, captured, replayed
                model.generate(prompt, 1)
            per: dict[str, list[float]] = {name: [] for name in variants}
            for r in range(a.rounds):
                for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                    graphs.DecodeSlots.take = variants[name]
                    per[name].append(ttft_ms(lambda: model.generate(prompt, 1).tolist(), a.calls))
            graphs.DecodeSlots.take = take
            # the prompt's device time: a forward into a kept cache, behind a sleep; forward_checked, since a
            # forward's input check reads the device, which would wait out the sleep and time the host's part too
            with torch.inference_mode(), generation_slot(model, 1, T + 1) as (cache, _):  # let go as generate does
                prompt_ms = device_ms(lambda: model.forward_checked(prompt, None, cache, 1), 5, before=cache.clear)
            row = [T, *(round(statistics.median(per[name]), 4) for name in variants), round(prompt_ms, 4)]
            table.append(row)
            print(f"{T:5d} tokens: " + "  ".join(f"{name} {v:.4f} ms" for name, v in zip(variants, row[1:]))
                  + f"  prompt device {row[-1]:.4f} ms", flush=True)
    finally:
        graphs.DecodeSlots.take = take
    if a.out:
        write_record(a.out, device=device, commit=commit, title="generate's first token: the kept cache taken "
                     "without the bindings' scan against the scan first",
                     what=f"{a.shape}, bf16, random weights, batch 1; median over {a.rounds} alternated rounds of "
                          f"each round's median of {a.calls} calls of generate(ids, 1).tolist(); the prompt's device "
                          "time: a forward into a kept cache (forward_checked: no read of the device) queued "
                          "behind a GPU sleep (median of 5)",
                     columns=["prompt tokens", *(f"{name} ms" for name in variants), "prompt device ms"], rows=table)


if __name__ == "__main__":
    main()
