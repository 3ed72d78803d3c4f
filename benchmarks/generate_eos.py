"""What an eos check costs generate: the same greedy generation timed without eos, with eos as generate
checks it (the all-finished flag read on the host one step late, so the next decode step is already queued
on the GPU), and with the check generate made before 43053b9 (the flag read at once: the host waits for
every step before enqueueing the next; `per_step_wait_generate` below). The eos id is a token the greedy
continuation never produces, so every variant runs all its steps and returns the same tokens. One more
variant, "stream, no eos": the same generation through model.stream, every step's tokens taken on the host as
a user's loop takes them (each read one step late), to set against "no eos".

    python benchmarks/generate_eos.py --shape smollm2-135m --new 128 --rounds 5 --out eos.json

Same process, variants alternated round by round (order reversed every other round), CUDA events around
each generate call (prefill included: the same in every variant), medians.
"""

from __future__ import annotations

import argparse
import statistics

import torch

VARIANTS = ("no eos", "eos, read a step late", "eos, per-step wait", "stream, no eos")


@torch.inference_mode()
def per_step_wait_generate(model, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int) -> torch.Tensor:
    """Greedy generate with the eos check it had before 43053b9 (on today's kept caches and graphs, so
    that only the check differs): after each step the host reads whether every row has finished (a wait
    for that step) before it enqueues the next decode step."""
    from cqil_kernels.generation import generation_slot, prefill

    batch, prompt_len = input_ids.shape
    with generation_slot(model, batch, prompt_len + max_new_tokens) as (cache, decode):  # let go as generate does
        logits = prefill(model, input_ids, None, cache)
        eos = torch.tensor([eos_token_id], device=model.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=model.device)
        tokens = [input_ids]
        for step in range(max_new_tokens):
            next_tokens = torch.where(finished, eos[0], model.argmax(logits))
            finished |= torch.isin(next_tokens, eos)
            tokens.append(next_tokens[:, None])
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            logits = decode(next_tokens)
    return torch.cat(tokens, dim=1)


def unused_token(tokens: torch.Tensor, vocab_size: int) -> int:
    """The smallest token id not among `tokens`: an eos that a deterministic run never emits."""
    seen = set(tokens.flatten().tolist())
    return next(t for t in range(vocab_size) if t not in seen)


def main(argv=None) -> None:
    from cqil_kernels import CQILConfig
    from cqil_kernels.bench import _commit, _warm_up_gpu, random_model, write_record
    from cqil_kernels.demo import parse_groups

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--groups", default="none", help="CQIL groups as `cqil demo --groups` reads them; none")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("generate_eos measures GPU time and needs a CUDA device")
    device, commit = torch.device("cuda"), _commit()
    model = random_model(a.shape, torch.bfloat16, device)
    model.cqil = CQILConfig() if a.groups == "none" else parse_groups(a.groups)
    ids = torch.randint(0, model.args.vocab_size, (a.batch, a.prompt), device=device)
    free = model.generate(ids, a.new)
    eos = unused_token(free[:, a.prompt:], model.args.vocab_size)
    runs = {"no eos": lambda: model.generate(ids, a.new),
            "eos, read a step late": lambda: model.generate(ids, a.new, eos_token_id=eos),
            "eos, per-step wait": lambda: per_step_wait_generate(model, ids, a.new, eos),
            "stream, no eos": lambda: torch.cat([ids, *(t.to(device)[:, None] for t in list(model.stream(ids, a.new)))],
                                                dim=1)}
    for name, run in runs.items():  # compile, capture; all return the eos-free tokens
        if not torch.equal(run(), free):
            raise SystemExit(f"{name}: not the eos-free tokens")
    _warm_up_gpu(device, 1.0)
    times = {name: [] for name in runs}
    for r in range(a.rounds):
        for name in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            runs[name]()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    rows = []
    base = statistics.median(times["no eos"])
    for name in VARIANTS:
        ms = statistics.median(times[name])
        rows.append([name, round(ms, 3), round((ms - base) / (a.new - 1) * 1e3, 2)])
        print(f"{name:>22}: {ms:.3f} ms for {a.new} tokens ({(ms - base) / (a.new - 1) * 1e3:+.2f} us a step "
              f"over no eos)", flush=True)
    write_record(a.out, device=device, commit=commit, title=f"What an eos check and streaming cost generate: {a.shape}",
                 what=(f"bf16, batch {a.batch}, {a.prompt}-token prompt, {a.new} greedy tokens, groups {a.groups}; "
                       f"CUDA events around each generate call (prefill included), variants alternated over "
                       f"{a.rounds} rounds, medians; the eos id is a token the run never emits"),
                 columns=["variant", "ms per generate", "us a step over no eos"], rows=rows, times_ms=times)


if __name__ == "__main__":
    main()
