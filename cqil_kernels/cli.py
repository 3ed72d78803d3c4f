"""The `cqil` command (also `python -m cqil_kernels`)."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(prompt=args.prompt, groups=args.groups, bypass=args.bypass, bypass_mode=args.bypass_mode,
             max_new_tokens=args.max_new_tokens, device=args.device, dtype=args.dtype, tiny=args.tiny)
    return 0


def _generate(args) -> int:
    """Load MODEL (with --cqil's grouping, --lora merged), tokenize --prompt (as a chat turn with --chat) and
    print the continuation as it is made (model.stream); a summary line on stderr."""
    import time

    import torch

    from .config import CQILConfig
    from .generation import sampling_set
    from .llama import CQILLlama
    from .quality import load_tokenizer

    if args.model == "tiny":
        raise ValueError("cqil generate needs a model with a tokenizer (a Hugging Face directory or a .gguf file)")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    given = ["--" + name.replace("_", "-") for name in sampling_set(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)]
    if given and not args.sample:
        raise ValueError(f"{', '.join(given)} set the sampling, which needs --sample (without it: greedy)")
    cqil = CQILConfig.load(args.cqil) if args.cqil else None
    tokenizer = load_tokenizer(args.model)  # before the weights: a model without one fails at once
    text = args.prompt
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat: this model's tokenizer has no chat template; pass the prompt as plain text")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    if ids.numel() == 0:
        raise ValueError("--prompt gives no tokens")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = CQILLlama.from_pretrained(args.model, cqil=cqil, device=args.device, dtype=dtype, lora=args.lora,
                                      progress=True)
    sampling = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    seed=args.seed) if args.sample else {}
    new, shown = [], ""
    start = time.perf_counter()
    # the prompt stays on the host: stream checks it there and moves it to the model's device, no device read
    for tokens in model.stream(ids, args.max_new_tokens, eos_token_id=tokenizer.eos_token_id, **sampling):
        new.append(int(tokens[0]))
        decoded = tokenizer.decode(new, skip_special_tokens=True)
        if decoded.endswith("\ufffd"):  # part of a character: wait for the rest of its bytes
            continue
        print(decoded[len(shown):] if decoded.startswith(shown) else "\n" + decoded, end="", flush=True)
        shown = decoded
    seconds = time.perf_counter() - start
    print()
    print(f"{len(new)} new tokens in {seconds:.2f} s, the {ids.shape[1]}-token prompt included; groups "
          f"{[list(g) for g in model.cqil.groups]}; {model.dtype} on {model.device}", file=sys.stderr)
    return 0


def _info(args) -> int:
    import torch

    from . import __version__, _ext, envs

    print(f"cqil_kernels {__version__}, torch {torch.__version__}, "
          f"torch.cuda.is_available() = {torch.cuda.is_available()}")
    print("settings (environment variables, cqil_kernels/envs.py):\n  " + envs.describe().replace("\n", "\n  "))
    if not _ext.available():
        print(f"extension: unavailable: {_ext.unavailable_reason()}")
        return 0
    print(f"extension: {_ext.build_info()}")
    reason = _ext.cuda_unavailable_reason()
    print("extension CUDA part: " + ("usable" if reason is None else f"not usable here: {reason}"))
    return 0


def _bench(args) -> int:
    import json

    from . import bench

    if args.plot:
        for path in args.plot:
            record = json.loads(open(path).read())
            bench.plot(record, path.rsplit(".", 1)[0] + ".png")
        return 0
    command = "cqil bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "cqil bench"
    out = args.out or f"bench_{args.shape}_b{args.batch}.json"
    # the record so far after each variant (with the variants still `pending`): a run cut short keeps its figures
    record = bench.run_bench(shape=args.shape, groups=args.groups, batch=args.batch, prompt=args.prompt,
                             new=args.new_tokens, dtype=args.dtype, repeats=args.repeats,
                             variants=tuple(args.variants.split(",")), command=command,
                             progress=lambda partial: bench.write_json(partial, out))
    for path in bench.write(record, out):
        print(f"wrote {path}")
    return 0


def _load_for_quality(args, cqil=None):
    """The model of `args.model` ("tiny": a tiny random one) with the grouping `cqil` (checked against the
    model's config before any weight is read; None: no groups)."""
    import torch

    from .config import CQILConfig
    from .demo import _tiny_model
    from .llama import CQILLlama

    cqil = cqil if cqil is not None else CQILConfig()
    if args.model == "tiny":
        model = _tiny_model(args.device, None)
        model.cqil = cqil
        return model
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return CQILLlama.from_pretrained(args.model, cqil=cqil, device=args.device, dtype=dtype, progress=True)


def _output_file(path: str, option: str = "--out"):
    """The Path of an output file, or ValueError when it names a directory or its folder is missing."""
    from pathlib import Path

    out = Path(path)
    if out.is_dir():
        raise ValueError(f"{option} {out} is a directory; give a file name")
    if not out.parent.is_dir():
        raise ValueError(f"{option} {out}: the folder {out.parent} does not exist")
    return out


def _text_ids(args, training: bool = False):
    """(ids, name) of the text: --text, or, without it, the shipped corpus (corpus.py): windows of --window
    of it to measure on, or all of it to train on."""
    from . import corpus, quality

    src = None if args.model == "tiny" else args.model
    if args.text is not None:
        return quality.read_token_ids(args.text, src), str(args.text)
    if src is None:
        raise ValueError("the tiny model has no tokenizer for the shipped corpus: pass --text with token ids "
                         "(a .ids or .pt file)")
    kinds = ", ".join(corpus.KINDS)
    if training:
        ids = corpus.training_ids(src)
        name = f"the shipped corpus ({kinds}): {ids.numel()} tokens"
    else:
        if args.stride is not None and args.stride != args.window:
            raise ValueError("--stride applies to --text; the shipped corpus is measured in whole windows")
        ids = corpus.calibration_ids(src, args.window, args.corpus_tokens)
        name = f"the shipped corpus ({kinds}): {ids.numel()} tokens in windows of {args.window}"
    print(f"text: {name}")
    return ids, name


def _print_rows(rows, baseline, confidence: float) -> None:
    interval = f"{100 * confidence:g}% interval"
    print(f"{'groups':<40} {'saved':>5} {'ppl':>9} {'Δppl %':>8} {interval:>17} {'agree':>6} {'KL':>8}  ok")
    print(f"{'(original)':<40} {0:>5} {baseline.perplexity:>9.3f} {0:>8.2f} {'':>17} {1:>6.3f} {0:>8.4f}")
    for row in rows:
        groups = ";".join(",".join(map(str, g)) for g in row["groups"])
        low, high = row["ppl_increase_ci_pct"]
        print(f"{groups:<40} {row['layers_saved']:>5} {row['ppl']:>9.3f} {row['ppl_increase_pct']:>8.2f} "
              f"{f'[{low:.2f}, {high:.2f}]':>17} {row['agreement']:>6.3f} {row['kl']:>8.4f}  "
              f"{'yes' if row['within_budget'] else 'no'}")


def _calibrate(args) -> int:
    import json
    from pathlib import Path

    from tqdm.auto import tqdm

    from . import quality
    from .files import atomic_write_text

    out = _output_file(args.out)
    model = _load_for_quality(args)
    src = None if args.model == "tiny" else args.model
    calib, text_name = _text_ids(args)
    held_out = quality.read_token_ids(args.eval_text, src) if args.eval_text else None
    sizes = tuple(int(p) for p in str(args.parallel).split(","))
    bar = tqdm(desc="groupings evaluated", unit="grouping")
    result = quality.find_quasi_independent_layers(
        model, calib, held_out, parallel=sizes if len(sizes) > 1 else sizes[0],
        max_ppl_increase=args.max_ppl_increase, bypass=args.bypass, bypass_mode=args.bypass_mode,
        window=args.window, stride=args.stride, beam=args.beam, confidence=args.confidence, seed=args.seed,
        progress=lambda row: bar.update(1))
    bar.close()
    _print_rows(result.candidates, result.baseline, args.confidence)
    result.config.save(out)
    report = dict(model=str(args.model), text=text_name, eval_text=str(args.eval_text or text_name),
                  parallel=list(sizes), max_ppl_increase=args.max_ppl_increase, confidence=args.confidence,
                  seed=args.seed, decision="the interval's upper end within the budget", window=args.window,
                  stride=args.stride or args.window, config=result.config.to_dict(),
                  layers_saved=result.layers_saved, baseline=result.baseline.row(), chosen=result.chosen.row(),
                  candidates=result.candidates, adjacent_similarity=[round(x, 4) for x in
                                                                      result.similarity.diagonal(1).tolist()])
    atomic_write_text(out.with_suffix(".report.json"), json.dumps(report, indent=1) + "\n")
    ci = result.chosen.ppl_increase_ci
    print(f"chosen: {[list(g) for g in result.config.groups]} saves {result.layers_saved} layer steps; "
          f"ppl {result.chosen.perplexity:.3f} vs {result.baseline.perplexity:.3f} "
          f"({100 * (result.chosen.perplexity / result.baseline.perplexity - 1):+.2f}%"
          + (f", {100 * args.confidence:g}% interval [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]%" if ci else "")
          + f"), agreement {result.chosen.agreement:.3f}")
    print(f"wrote {out} and {out.with_suffix('.report.json')}")
    try:
        quality.plot_similarity(result.similarity, result.config, out.with_suffix(".png"),
                                title=f"{Path(str(args.model)).name}: P={args.parallel}, budget "
                                      f"{100 * args.max_ppl_increase:g}% ppl")
        print(f"wrote {out.with_suffix('.png')}")
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)")
    return 0


def _eval(args) -> int:
    from . import quality
    from .config import CQILConfig

    config = CQILConfig.load(args.cqil)
    model = _load_for_quality(args, config)  # the grouping is checked before the weights are read
    model.cqil = CQILConfig()
    ids, _ = _text_ids(args)
    reference = quality.ReferenceRun(model, ids, window=args.window, stride=args.stride, seed=args.seed)
    metrics = reference.evaluate(config)
    base = reference.baseline
    low, high = metrics.ppl_increase_ci
    print(f"original: ppl {base.perplexity:.3f} over {base.tokens} tokens in {base.windows} windows")
    print(f"{[list(g) for g in config.groups]} (bypass {config.bypass}, {config.bypass_mode}): saves "
          f"{config.layers_saved} layer steps; ppl {metrics.perplexity:.3f} "
          f"({100 * (metrics.perplexity / base.perplexity - 1):+.2f}%, 90% interval over the windows "
          f"[{100 * low:+.2f}, {100 * high:+.2f}]%), agreement {metrics.agreement:.4f}, KL {metrics.kl:.5f}")
    return 0


def _finetune(args) -> int:
    """Train in OUT.partial/ (its checkpoints included) and move the finished adapter to OUT in one
    rename: OUT holds the previous result or the new one, never a mix of both."""
    import shutil
    from pathlib import Path

    from .config import CQILConfig
    from .files import replace_directory

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory for the adapter")
    if out.is_dir() and any(out.iterdir()) and not (args.overwrite or args.resume):
        raise ValueError(f"{out} exists and is not empty (pass --overwrite to replace it, or --resume)")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: the folder {out.parent} does not exist")
    if args.until is not None and not 1 <= args.until <= args.steps:
        raise ValueError(f"--until must be a step in [1, --steps = {args.steps}], got {args.until}")
    part = args.until is not None and args.until < args.steps  # a part of the run: nothing goes to OUT yet
    work = out.with_name(out.name + ".partial")
    checkpoint = work / CHECKPOINT_NAME
    if args.resume:
        previous = [c for c in (checkpoint, out / CHECKPOINT_NAME) if c.exists()]
        if not previous:
            old = [c for c in (work / "checkpoint.pt", out / "checkpoint.pt") if c.exists()]
            raise ValueError(f"--resume: no {CHECKPOINT_NAME} in {work} or {out}" + (
                f" ({old[0]} is the pickled format of an older version, which is not read: a pickle can run code)"
                if old else ""))
    elif work.exists():
        shutil.rmtree(work)  # an interrupted run's leftovers: this run starts afresh
    cqil = CQILConfig.load(args.cqil)
    model = _load_for_quality(args, cqil)  # the grouping is checked before the weights are read
    work.mkdir(exist_ok=True)
    try:
        if args.resume and not checkpoint.exists():  # extending a finished run
            shutil.copyfile(out / CHECKPOINT_NAME, checkpoint)
        _train(args, model, work, part)
    except BaseException as e:
        # keep the checkpoints of an interrupted run for --resume; a run that failed before writing one,
        # or whose loss diverged, leaves nothing behind
        if not checkpoint.exists() or isinstance(e, FloatingPointError):
            shutil.rmtree(work, ignore_errors=True)
        elif isinstance(e, KeyboardInterrupt):
            print(f"interrupted: continue with --resume (the last checkpoint is in {work})", file=sys.stderr)
        raise
    if part:
        print(f"trained to step {args.until} of {args.steps}: its checkpoint is in {work}; go on with --resume and "
              f"the same arguments (--until a later step, or none to finish)")
        return 0
    replace_directory(work, out)
    print(f"wrote the adapter (PEFT format), cqil.json and the training log to {out}")
    return 0


CHECKPOINT_NAME = "checkpoint.safetensors"


def _train(args, model, work, part: bool = False) -> None:
    """Train, then (unless `part`: a run stopped at --until) save the adapter and its log in `work`, and
    score the held-out text before and after."""
    import torch
    from tqdm.auto import tqdm

    from . import quality
    from .finetune import finetune, save_adapter, write_log

    model.backend = "torch"  # training needs it; the metrics before and after then come from the same code
    src = None if args.model == "tiny" else args.model
    ids, _ = _text_ids(args, training=True)
    held_out = quality.read_token_ids(args.eval_text, src) if args.eval_text and not part else None
    if held_out is not None:
        if args.eval_tokens < args.window:
            raise ValueError(f"--eval-tokens {args.eval_tokens} is less than one --window of {args.window}")
        if held_out.numel() > args.eval_tokens:
            print(f"held-out text: scoring its first {args.eval_tokens} of {held_out.numel()} tokens (--eval-tokens)")
            held_out = held_out[:args.eval_tokens]
        # on the CPU: the training between the two evaluations needs the GPU's memory
        before = quality.ReferenceRun(model, held_out, window=args.window, stride=args.stride, seed=args.seed,
                                      store="cpu")
        grouped_before = before.evaluate(model.cqil)
    with tqdm(total=args.until or args.steps, desc="KD fine-tuning", unit="step") as bar:
        def progress(step, loss):  # step counts from 1 over the whole run: a resumed one starts past its checkpoint
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)  # update() redraws, at most every mininterval
            bar.update(step - bar.n)

        log = finetune(model, ids, steps=args.steps, rank=args.lora_rank, window=args.window, batch=args.batch,
                       lr=args.lr, schedule=args.schedule, warmup=args.warmup, temperature=args.temperature,
                       ce_weight=args.ce_weight, only_grouped=args.only_grouped, seed=args.seed,
                       progress=progress, checkpoint=work / CHECKPOINT_NAME, checkpoint_every=args.checkpoint_every,
                       resume=args.resume, until=args.until,
                       autocast_dtype=(None if args.autocast == "none" else "auto" if args.autocast == "auto"
                                       else getattr(torch, args.autocast)),
                       recompute={"auto": None, "on": True, "off": False}[args.recompute])
    if part:
        return
    save_adapter(model, work, base_name=str(args.model))
    write_log(log, work)
    print(f"KD loss {log.losses[0]:.4f} -> {log.losses[-1]:.4f} over {args.steps} steps")
    if held_out is not None:
        after = before.evaluate(model.cqil)  # the adapters are live in the model
        base = before.baseline
        print(f"{'':<22} {'ppl':>9} {'Δppl %':>8} {'agree':>6} {'KL':>8}")
        for name, m in (("original", base), ("grouped, before", grouped_before), ("grouped, after", after)):
            print(f"{name:<22} {m.perplexity:>9.3f} {100 * (m.perplexity / base.perplexity - 1):>8.2f} "
                  f"{m.agreement:>6.3f} {m.kl:>8.4f}")


def _quality_args(p, corpus_tokens: bool = True) -> None:
    """The arguments of calibrate, eval and finetune; without --text they use the shipped corpus (windows of
    --corpus-tokens of it where corpus_tokens, all of it for training)."""
    from .corpus import DEFAULT_TOKENS

    p.add_argument("model", help="a Hugging Face directory, a .gguf file, or 'tiny' (a tiny random model)")
    p.add_argument("--text", default=None, help="text (tokenized with the model's tokenizer), or token ids: .pt "
                                                "tensor / .ids file (default: the shipped corpus of four kinds of "
                                                "text, cqil_kernels/texts/README.md)")
    if corpus_tokens:
        p.add_argument("--corpus-tokens", type=int, default=DEFAULT_TOKENS,
                       help=f"tokens of the shipped corpus measured without --text (default {DEFAULT_TOKENS})")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--stride", type=int, default=None, help="window step (default: the window)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap over windows (and of training)")


def build_parser() -> argparse.ArgumentParser:
    from .demo import DEFAULT_GROUPS, DEFAULT_PROMPT

    parser = argparse.ArgumentParser(prog="cqil", description="CQIL inference for LLaMA models")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="original vs CQIL-grouped generation on SmolLM2-135M-Instruct")
    demo.add_argument("--prompt", default=DEFAULT_PROMPT)
    demo.add_argument("--groups", default=DEFAULT_GROUPS,
                      help="START-END:P (groups of P over [START, END)) or '12,13;14,15' "
                           f"(default {DEFAULT_GROUPS})")
    demo.add_argument("--bypass", type=int, default=0, help="bypass distance d (default 0)")
    demo.add_argument("--bypass-mode", choices=["residual", "mlp_input"], default="residual")
    demo.add_argument("--max-new-tokens", type=int, default=48)
    demo.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    demo.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                      help="default: bfloat16 on cuda, float32 on cpu")
    demo.add_argument("--tiny", action="store_true", help="use a tiny random model (no download needed)")
    demo.set_defaults(func=_demo)

    from .bench import DEFAULT_GROUPS as BENCH_GROUPS, SHAPES, VARIANTS

    bench = sub.add_parser("bench", help="end-to-end prefill/decode latency on the GPU: transformers "
                                         "eager vs ours (torch, Triton sequential, Triton CQIL)")
    bench.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m",
                       help="published config, random weights (default smollm2-135m)")
    bench.add_argument("--groups", default=None,
                       help=f"CQIL groups as in `cqil demo` (default per shape: {BENCH_GROUPS})")
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--prompt", type=int, default=512, help="prompt tokens (default 512)")
    bench.add_argument("--new-tokens", type=int, default=64, help="decode steps timed (default 64)")
    bench.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    bench.add_argument("--repeats", type=int, default=5, help="runs per figure; the median is kept")
    bench.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    bench.add_argument("--out", default=None, help="JSON path (a PNG is written beside it)")
    bench.add_argument("--plot", nargs="+", metavar="JSON", help="only (re)draw the PNG of saved results")
    bench.set_defaults(func=_bench)

    cal = sub.add_parser("calibrate", help="find the CQIL groups that save the most layer steps within a "
                                           "perplexity budget")
    _quality_args(cal)
    cal.add_argument("--eval-text", default=None, help="held-out text for the metrics (default: --text)")
    cal.add_argument("--parallel", default="2", help="group size P, or sizes to mix: 2,3,4 (default 2)")
    cal.add_argument("--max-ppl-increase", type=float, default=0.05,
                     help="perplexity budget as a fraction (default 0.05 = +5%%)")
    cal.add_argument("--bypass", type=int, default=0)
    cal.add_argument("--bypass-mode", choices=["residual", "mlp_input"], default="residual")
    cal.add_argument("--beam", type=int, default=6, help="candidates evaluated per round (default 6)")
    cal.add_argument("--confidence", type=float, default=0.90,
                     help="the bootstrap interval over the windows whose upper end must hold the budget "
                          "(default 0.90: a one-sided 95%% bound)")
    cal.add_argument("--out", default="groups.json",
                     help="CQILConfig JSON (a .report.json and a .png are written beside it)")
    cal.set_defaults(func=_calibrate)

    ev = sub.add_parser("eval", help="perplexity, agreement and KL of one grouping against the original")
    _quality_args(ev)
    ev.add_argument("--cqil", required=True, help="groups JSON (CQILConfig / the authors' keys)")
    ev.set_defaults(func=_eval)

    ft = sub.add_parser("finetune", help="LoRA fine-tuning of a grouping by distillation from the original")
    _quality_args(ft, corpus_tokens=False)
    ft.add_argument("--cqil", required=True, help="groups JSON (e.g. from cqil calibrate)")
    ft.add_argument("--eval-text", default=None, help="held-out text: metrics before and after")
    ft.add_argument("--eval-tokens", type=int, default=16384,
                    help="score at most this many held-out tokens (the original's log-probabilities over the "
                         "vocabulary are kept in memory for the KL: tokens x vocab x 4 bytes; default 16384)")
    ft.add_argument("--steps", type=int, default=200)
    ft.add_argument("--lora-rank", type=int, default=8)
    ft.add_argument("--batch", type=int, default=4)
    ft.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    ft.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                    help="after warm-up: cosine decay to lr/10 at the last step, or constant (default cosine)")
    ft.add_argument("--warmup", type=int, default=None,
                    help="steps of linear warm-up (default: steps/20, at most 100)")
    ft.add_argument("--temperature", type=float, default=1.0)
    ft.add_argument("--ce-weight", type=float, default=0.0, help="weight of a cross-entropy term")
    ft.add_argument("--only-grouped", action="store_true", help="adapters on grouped layers only")
    ft.add_argument("--out", required=True, help="adapter directory (PEFT format + cqil.json)")
    ft.add_argument("--overwrite", action="store_true")
    ft.add_argument("--checkpoint-every", type=int, default=50,
                    help=f"steps between checkpoints (OUT.partial/{CHECKPOINT_NAME}, written atomically)")
    ft.add_argument("--resume", action="store_true",
                    help=f"continue from the last checkpoint (OUT.partial/{CHECKPOINT_NAME}, or OUT's own to train a "
                         f"finished run further)")
    ft.add_argument("--until", type=int, default=None,
                    help="stop after this step (of the --steps schedule) with its checkpoint in OUT.partial/ and "
                         "nothing in OUT yet: a run in parts, each within a job's time limit; go on with --resume "
                         "(and the same arguments), which ends where one run would have")
    ft.add_argument("--autocast", choices=["auto", "bfloat16", "float16", "none"], default="auto",
                    help="torch.autocast dtype of the forwards (auto: bfloat16 on CUDA, none elsewhere)")
    ft.add_argument("--recompute", choices=["auto", "on", "off"], default="auto",
                    help="gradient checkpointing of every layer (auto: on for CUDA)")
    ft.set_defaults(func=_finetune)

    gen = sub.add_parser("generate", help="continue a prompt, printing the text as it is made")
    gen.add_argument("model", help="a Hugging Face directory or a .gguf file (with its tokenizer)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="the prompt as a user turn of the model's chat template")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--cqil", default=None, help="groups JSON (default: the checkpoint's cqil_layers, or none)")
    gen.add_argument("--lora", default=None, help="a PEFT LoRA adapter directory, merged (e.g. cqil finetune's)")
    gen.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    gen.set_defaults(func=_generate)

    info = sub.add_parser("info", help="versions, and whether the compiled extension and CUDA are usable")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command. A user error (bad input, a bad or missing file, a bad device, a run that
    diverged) is one line on stderr and exit code 2; Ctrl-C is exit code 130."""
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "device", None) is not None:
            from .checkpoint import check_device

            check_device(args.device)
        return args.func(args)
    except (ValueError, TypeError, OSError, ImportError, FloatingPointError) as e:
        print(f"cqil {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cqil {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return " ".join(text.split())
