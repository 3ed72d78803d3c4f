"""Does an adapter distilled on one text hold on other kinds of text? (issue 25, item 4)

    python benchmarks/kd_domains.py MODEL --cqil GROUPS.json --train corpus --domains DIR \\
        --steps 160 --batch 2 --out kd.json

--train: `corpus` (the shipped corpus, `cqil finetune`'s default) or a text file (e.g. DIR/docs_train.txt).
--domains: a folder of KIND.txt files (benchmarks/domain_texts.py writes them); each is measured on
--windows windows of --window tokens spread evenly over it, against the original model on the same
windows, before and after `finetune` with `cqil finetune`'s defaults but --steps, --batch and
--lora-rank: perplexity increase with its 90% paired-bootstrap interval, agreement and KL. The goal of
issue 25: after training, the increase on a kind of text the training text does not have is at most
twice the increase in-domain.
Writes a record (card, date, commit, command, rows). In two runs, where one would not fit a time limit:
--adapter-out DIR saves the trained adapter and its schedule; a later run with --adapter DIR (no --train)
measures it again before and after, merged into the weights. Training itself in parts: --checkpoint FILE
--until N trains steps 1..N of the --steps schedule and stops there (nothing measured); a run with
--checkpoint FILE --resume (and --until M, or to the end) continues it, to the adapter one run would give.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cqil_kernels import CQILConfig, CQILLlama, corpus
from cqil_kernels.bench import _commit, write_record
from cqil_kernels.finetune import finetune, save_adapter
from cqil_kernels.lora import merge_lora
from cqil_kernels.quality import ReferenceRun, read_token_ids


def measured(reference: ReferenceRun, cqil: CQILConfig) -> dict:
    m = reference.evaluate(cqil)
    low, high = m.ppl_increase_ci
    return dict(increase_pct=round(100 * (m.perplexity / reference.baseline.perplexity - 1), 2),
                ci_pct=[round(100 * low, 2), round(100 * high, 2)], agreement=round(m.agreement, 4),
                kl=round(m.kl, 4))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--cqil", required=True, help="the grouping (CQILConfig JSON)")
    ap.add_argument("--train", help="'corpus' or a text file (not with --adapter)")
    ap.add_argument("--domains", type=Path, required=True, help="folder of KIND.txt files to measure on")
    ap.add_argument("--skip", default="docs_train", help="comma-separated kinds of --domains not measured")
    ap.add_argument("--windows", type=int, default=12)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--recompute", choices=["on", "off"], default="off",
                    help="gradient checkpointing (default off, as the H100 finetune run: on costs a second forward "
                         "per step and is only needed where the activations do not fit)")
    ap.add_argument("--backend", choices=["torch", "auto"], default="torch",
                    help="the backend of the measurements (training runs the torch path, its adapters live): torch "
                         "(default: cuBLAS, nothing to compile) or auto (the fused kernels on CUDA, which compile and "
                         "autotune every new fp32 shape first)")
    ap.add_argument("--adapter-out", type=Path, default=None,
                    help="also save the trained adapter here (PEFT LoRA, cqil.json, kd_train.json: the schedule)")
    ap.add_argument("--adapter", type=Path, default=None,
                    help="no training: measure an adapter an earlier run saved with --adapter-out (merged into the "
                         "weights), so that training and measuring can go in two calls of a device with a time limit")
    ap.add_argument("--checkpoint", type=Path, default=None, help="finetune's checkpoint file (--until, --resume)")
    ap.add_argument("--until", type=int, default=None,
                    help="train steps up to this one of the --steps schedule, keep them in --checkpoint and stop "
                         "(nothing measured) where it is before --steps")
    ap.add_argument("--resume", action="store_true", help="continue the training in --checkpoint")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    if a.adapter is not None and (a.adapter_out is not None or a.train is not None):
        raise SystemExit("--adapter measures a saved adapter without training: no --train, no --adapter-out")
    if a.adapter is None and a.train is None:
        raise SystemExit("--train is needed (or --adapter: a saved adapter, no training)")
    if (a.until is not None or a.resume) and (a.checkpoint is None or a.adapter is not None):
        raise SystemExit("--until and --resume train in parts through --checkpoint (not with --adapter)")
    if a.until is not None and not 1 <= a.until <= a.steps:
        raise SystemExit(f"--until must be in [1, --steps = {a.steps}], got {a.until}")
    part_only = a.until is not None and a.until < a.steps  # a training part: nothing to measure yet
    commit = _commit()  # the code this run loads (a later commit may land while it runs)
    cqil = CQILConfig.load(a.cqil)
    trained = None  # the schedule of a saved adapter (--adapter)
    if a.adapter is not None:
        if CQILConfig.load(a.adapter / "cqil.json") != cqil:
            raise SystemExit(f"--adapter {a.adapter} was trained for another grouping than --cqil {a.cqil}")
        trained = json.loads((a.adapter / "kd_train.json").read_text())
    clock = time.perf_counter()

    def took(what: str) -> None:  # each phase's time: at d1a3c1f on the H100 the part before training took
        nonlocal clock  # ~7 of a 9-minute run's minutes, and nothing said which part
        now = time.perf_counter()
        print(f"{what}: {now - clock:.1f} s", flush=True)
        clock = now

    # fp32 weights everywhere (on CUDA finetune's forwards run under bf16 autocast, as `cqil finetune`'s)
    model = CQILLlama.from_pretrained(a.model, cqil=CQILConfig(), device=a.device, dtype=torch.float32)
    model.backend = a.backend
    took("model loaded")
    if part_only:
        train_adapter(model, a, cqil)
        took(f"trained to step {a.until} of {a.steps}, kept in {a.checkpoint} (go on with --resume)")
        return
    skip = set(a.skip.split(","))
    references = {}
    for path in sorted(a.domains.glob("*.txt")):
        if path.stem not in skip:
            ids = corpus.spread_windows(read_token_ids(path, a.model), a.windows, a.window)
            took(f"{path.stem} tokenized")
            references[path.stem] = ReferenceRun(model, ids, window=a.window, store="cpu")  # GPU: training's
            took(f"{path.stem} reference scored")
    before = {}
    for kind, ref in references.items():
        before[kind] = measured(ref, cqil)
        print(f"before {kind}: {before[kind]}", flush=True)
    took("before measured")
    if trained is None:
        trained = train_adapter(model, a, cqil)
        took("trained")
        if a.adapter_out is not None:
            with model.grouping(cqil):  # its cqil.json: the grouping it was trained for
                save_adapter(model, a.adapter_out, base_name=str(a.model))
            (a.adapter_out / "kd_train.json").write_text(json.dumps(trained, indent=1) + "\n")
    else:
        merge_lora(model, a.adapter)
        took(f"adapter {a.adapter} merged")
    rows = []
    for kind, ref in references.items():
        after = measured(ref, cqil)
        print(f"after {kind}: {after}", flush=True)
        rows.append([kind, before[kind]["increase_pct"], before[kind]["ci_pct"], after["increase_pct"],
                     after["ci_pct"], before[kind]["agreement"], after["agreement"], before[kind]["kl"],
                     after["kl"]])
    took("after measured")
    layers = model.args.num_hidden_layers
    t = trained
    write_record(a.out, device=model.device, commit=commit,
                 title="LoRA distillation measured on kinds of text other than the training text",
                 what=f"{Path(a.model).name}, fp32, groups {[list(g) for g in cqil.groups]}"
                      f" ({layers} -> {len(cqil.stages(layers))} layer steps); trained on {t['train']} "
                      f"({t['train_tokens']} tokens), {t['steps']} steps of {t['batch']} x {t['window']} tokens, rank "
                      f"{t['lora_rank']}, lr 1e-3 cosine, recompute {t['recompute']}"
                      f"{' (trained in parts: train_seconds is the last part)' if t.get('resumed') else ''}; "
                      f"measured with the {a.backend} backend"
                      f"{f', the adapter of an earlier run merged ({a.adapter})' if a.adapter is not None else ''}; "
                      f"each kind: {a.windows} windows of {a.window} spread over it, 90% paired-bootstrap intervals "
                      "over windows",
                 train_seconds=t["seconds"], train_resumed=t.get("resumed", False), kd_loss=t["kd_loss"],
                 columns=["kind", "increase before %", "before 90% CI", "increase after %", "after 90% CI",
                          "agreement before", "agreement after", "KL before", "KL after"],
                 rows=rows)


def train_adapter(model, a, cqil: CQILConfig) -> dict:
    """finetune on the --train text with the grouping `cqil` (the adapters stay live on `model`); the schedule
    and its outcome, as the record and kd_train.json give them."""
    train = corpus.training_ids(a.model) if a.train == "corpus" else read_token_ids(a.train, a.model)
    start = time.perf_counter()

    def progress(step: int, loss: float) -> None:  # the rate, so that a run cut short by a timeout says it
        if step % 100 == 0 or step == a.steps:
            print(f"step {step}/{a.steps}: KD loss {loss:.4f}, {time.perf_counter() - start:.0f} s", flush=True)

    with model.grouping(cqil):
        log = finetune(model, train, steps=a.steps, batch=a.batch, window=a.window, rank=a.lora_rank,
                       progress=progress, recompute=a.recompute == "on", checkpoint=a.checkpoint,
                       resume=a.resume, until=a.until)
    seconds = time.perf_counter() - start
    print(f"KD loss {log.losses[0]:.4f} -> {log.losses[-1]:.4f} in {seconds:.0f} s", flush=True)
    return dict(train="the shipped corpus" if a.train == "corpus" else Path(a.train).name,
                train_tokens=train.numel(), steps=a.steps, batch=a.batch, window=a.window, lora_rank=a.lora_rank,
                recompute=a.recompute, seconds=round(seconds), resumed=a.resume,
                kd_loss=[round(log.losses[0], 4), round(log.losses[-1], 4)])


if __name__ == "__main__":
    main()
