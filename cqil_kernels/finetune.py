"""LoRA fine-tuning of a CQIL-grouped model by knowledge distillation from the original model.

The student is the model with its grouping and trainable LoRA adapters on the attention and MLP
projections; the teacher is the SAME weights with the grouping and the adapters switched off, so no
second copy of the model is held. The loss is temperature^2 * KL(teacher || student) of the next-token
distributions (plus, optionally, a cross-entropy term on the text). Only the adapters train.

The result is saved as a PEFT-format adapter (adapter_config.json + adapter_model.safetensors) with the
grouping beside it (cqil.json), which `CQILLlama.from_pretrained(base, lora=dir)` merges and applies.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import CQILConfig
from .files import atomic_write_bytes, load_safetensors, regular_file, safetensors_metadata

TARGETS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


class LoRALinear(nn.Module):
    """base(x) + scaling * (x @ A.T) @ B.T with A: [r, in] (PEFT's kaiming init), B: [out, r] = 0."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scaling, self.enabled = base, alpha / rank, True
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def weight(self) -> torch.Tensor:  # what code reading `proj.weight` expects: the base weight
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        lora = (x.to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T
        return out + (self.scaling * lora).to(out.dtype)


def add_lora(model, rank: int, alpha: float | None = None, layers: list[int] | None = None) -> dict:
    """Wrap the attention and MLP projections of `layers` (default: all) in LoRALinear; freeze the rest.
    Returns {(layer, block, name): LoRALinear}."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"the LoRA rank must be an int >= 1, got {rank!r}")
    alpha = float(alpha if alpha is not None else 2 * rank)
    for p in model.parameters():
        p.requires_grad_(False)
    adapters = {}
    for l in (range(len(model.layers)) if layers is None else layers):
        for block, names in TARGETS.items():
            owner = getattr(model.layers[l], block)
            for name in names:
                module = getattr(owner, name)
                if isinstance(module, LoRALinear):
                    raise ValueError(f"layer {l} {name} already has a LoRA adapter")
                wrapped = LoRALinear(module, rank, alpha)
                setattr(owner, name, wrapped)
                adapters[(l, block, name)] = wrapped
    model.adapters = adapters
    return adapters


@contextlib.contextmanager
def teacher_mode(model):
    """The original model on the same weights: grouping and adapters off, restored afterwards."""
    adapters = model.adapters
    with model.grouping(CQILConfig()):
        try:
            for a in adapters.values():
                a.enabled = False
            yield model
        finally:
            for a in adapters.values():
                a.enabled = True


@contextlib.contextmanager
def gradient_checkpointing(model):
    """Recompute each layer's attention and MLP in the backward pass instead of keeping their
    intermediate activations (the MLP's [tokens, intermediate] tensors dominate): memory per layer drops
    to its inputs, at the cost of one more forward. Same results (the recomputation is deterministic)."""
    from torch.utils.checkpoint import checkpoint

    patched = []
    for layer in model.layers:
        for name in ("attend", "feed_forward"):
            original = getattr(layer, name)

            def wrapped(*args, _fn=original):
                return checkpoint(_fn, *args, use_reentrant=False) if torch.is_grad_enabled() else _fn(*args)

            setattr(layer, name, wrapped)
            patched.append((layer, name))
    try:
        yield model
    finally:
        for layer, name in patched:
            delattr(layer, name)  # back to the class's method


def kd_loss(model, ids: torch.Tensor, temperature: float = 1.0, ce_weight: float = 0.0,
            autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """temperature^2 * mean over positions of KL(teacher || student), + ce_weight * cross-entropy.
    autocast_dtype: run both forwards under torch.autocast in that dtype (e.g. bfloat16 on a GPU); the
    losses are computed in fp32 either way."""
    amp = (torch.autocast(model.device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with amp:
        with torch.no_grad(), teacher_mode(model):
            teacher = model(ids)[:, :-1].float()
        student = model(ids)[:, :-1].float()
    t = F.log_softmax(teacher / temperature, -1)
    s = F.log_softmax(student / temperature, -1)
    loss = temperature ** 2 * (t.exp() * (t - s)).sum(-1).mean()
    if ce_weight:
        loss = loss + ce_weight * F.cross_entropy(student.reshape(-1, student.shape[-1]), ids[:, 1:].reshape(-1))
    return loss


@dataclass
class TrainLog:
    steps: list[int]
    losses: list[float]


SCHEDULES = ("cosine", "constant")


def learning_rate(step: int, steps: int, lr: float, warmup: int = 0, schedule: str = "cosine") -> float:
    """The learning rate of `step` (1-based) of a run of `steps`: linear warm-up over the first `warmup`
    steps, then constant, or a cosine decay from lr to lr / 10 at the last step."""
    if warmup and step <= warmup:
        return lr * step / warmup
    if schedule == "constant" or steps <= warmup + 1:
        return lr
    done = (step - warmup - 1) / (steps - warmup - 1)
    return lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * done)))


def _base_signature(model) -> list:
    """What a checkpoint must match: the config and a checksum of a few base weights."""
    a = model.args
    probe = [model.layers[0].self_attn.q_proj.weight, model.layers[-1].mlp.down_proj.weight,
             model.embed_tokens.weight]
    return [a.num_hidden_layers, a.hidden_size, a.intermediate_size, a.vocab_size,
            [round(float(w.detach().double().sum()), 3) for w in probe]]


CHECKPOINT_FORMAT = "cqil-finetune-checkpoint/1"


def _adapter_name(key: tuple[int, str, str]) -> str:
    return ".".join(map(str, key))


def save_checkpoint(path: Path, *, state: dict, adapters: dict, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator) -> None:
    """Write a training checkpoint atomically (an interrupted run leaves the previous complete one).

    One safetensors file: the adapters, the optimizer's tensors and the data-order RNG state as tensors;
    everything else (step, plan, losses, the optimizer's hyper-parameters) as JSON in its metadata. Neither
    part can run code when read, unlike a pickle."""
    from safetensors.torch import save

    tensors = {"generator": generator.get_state()}
    for key, a in adapters.items():
        tensors[f"adapter.{_adapter_name(key)}.A"] = a.lora_A.detach().cpu().contiguous()
        tensors[f"adapter.{_adapter_name(key)}.B"] = a.lora_B.detach().cpu().contiguous()
    opt = optimizer.state_dict()
    for index, param_state in opt["state"].items():
        for name, value in param_state.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {name!r} is a {type(value).__name__}, not a tensor")
            tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
    meta = dict(state, format=CHECKPOINT_FORMAT, adapters=[_adapter_name(k) for k in adapters],
                param_groups=opt["param_groups"])
    atomic_write_bytes(path, save(tensors, metadata={"cqil": json.dumps(meta)}))


def load_checkpoint(path: Path, *, adapters: dict, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator) -> dict:
    """Read a checkpoint of save_checkpoint into the adapters, the optimizer and the generator, and
    return its JSON part. ValueError naming the file for anything that is not such a checkpoint of this
    run's adapters (nothing is changed then)."""
    with open(regular_file(path, "checkpoint"), "rb") as f:
        if f.read(2) == b"PK":  # torch.save's zip container
            raise ValueError(f"{path}: a pickled checkpoint (torch.save, older versions of this package); it is "
                             f"not read, because a pickle can run code: start the run again")
    tensors = load_safetensors(path)
    try:
        meta = json.loads(safetensors_metadata(path)["cqil"])
        if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"format {meta.get('format') if isinstance(meta, dict) else meta!r}")
        names = [_adapter_name(k) for k in adapters]
        if meta["adapters"] != names:
            raise ValueError("it holds adapters for other layers or modules")
        for key, a in adapters.items():
            for which, param in (("A", a.lora_A), ("B", a.lora_B)):
                t = tensors[f"adapter.{_adapter_name(key)}.{which}"]
                if t.shape != param.shape or t.dtype != param.dtype or not bool(torch.isfinite(t).all()):
                    raise ValueError(f"adapter {_adapter_name(key)} lora_{which} is not a finite "
                                     f"{tuple(param.shape)} {param.dtype} tensor")
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state = {}
        for name, t in tensors.items():
            if name.startswith("optimizer."):
                _, index, field = name.split(".", 2)
                index = int(index)
                if not 0 <= index < len(params):
                    raise ValueError(f"optimizer state for parameter {index} of {len(params)}")
                if t.dim() > 0 and (t.shape != params[index].shape or not bool(torch.isfinite(t).all())):
                    raise ValueError(f"optimizer state {name} is not a finite {tuple(params[index].shape)} tensor")
                state.setdefault(index, {})[field] = t
        opt_state = {"state": state, "param_groups": meta["param_groups"]}
        for k in ("step", "rank", "seed"):
            if isinstance(meta[k], bool) or not isinstance(meta[k], int):
                raise ValueError(f"{k} is not an int")
        if not (isinstance(meta["steps"], list) and isinstance(meta["losses"], list)
                and len(meta["steps"]) == len(meta["losses"]) == meta["step"]):
            raise ValueError("its loss log does not match its step")
        generator_state = tensors["generator"]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: not a fine-tuning checkpoint this run can resume ({e})") from None
    saved_rng = generator.get_state()
    try:
        generator.set_state(generator_state)
        optimizer.load_state_dict(opt_state)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        generator.set_state(saved_rng)
        raise ValueError(f"{path}: not a fine-tuning checkpoint this run can resume ({e})") from None
    with torch.no_grad():
        for key, a in adapters.items():
            a.lora_A.copy_(tensors[f"adapter.{_adapter_name(key)}.A"])
            a.lora_B.copy_(tensors[f"adapter.{_adapter_name(key)}.B"])
    return meta


def finetune(model, ids: torch.Tensor, *, steps: int, rank: int = 8, alpha: float | None = None,
             window: int = 256, batch: int = 4, lr: float = 1e-3, schedule: str = "cosine",
             warmup: int | None = None, temperature: float = 1.0,
             ce_weight: float = 0.0, only_grouped: bool = False, seed: int = 0, progress=None,
             checkpoint: str | Path | None = None, checkpoint_every: int = 0, resume: bool = False,
             until: int | None = None, autocast_dtype: torch.dtype | None | str = "auto",
             recompute: bool | None = None) -> TrainLog:
    """Train LoRA adapters on `model` (with its current grouping) to match the original model on `ids`.

    Windows of `window` tokens are drawn from the text (seeded); AdamW on the adapters only, its learning
    rate from `learning_rate` (schedule "cosine" or "constant"; warmup: steps of linear warm-up, default
    steps // 20 capped at 100). The model is
    trained with the torch backend (the fused kernels know nothing of adapters) and left in eval mode.
    checkpoint: a file written atomically every `checkpoint_every` steps and at the end (adapters,
    optimizer, data-order RNG, losses); resume=True continues from it to the same result as an
    uninterrupted run (the checkpoint records steps and schedule: resuming with others is an error, except
    more steps of a constant schedule).
    until: stop after this step (at most `steps`; the schedule is still that of `steps`), the checkpoint
    written there: a run in parts, each within a time limit, whose last part (resume=True, until=None)
    ends where one run would have.
    autocast_dtype: torch.autocast dtype for the forwards ("auto": bfloat16 on CUDA, none elsewhere).
    recompute: gradient checkpointing (gradient_checkpointing above); None = on for CUDA.
    The adapters themselves are fp32 whatever the model's dtype.
    """
    if autocast_dtype == "auto":
        autocast_dtype = torch.bfloat16 if model.device.type == "cuda" else None
    floating = isinstance(autocast_dtype, torch.dtype) and autocast_dtype.is_floating_point
    if autocast_dtype is not None and not floating:
        raise TypeError(f"autocast_dtype must be a floating torch.dtype, None or 'auto', got {autocast_dtype!r}")
    recompute = model.device.type == "cuda" if recompute is None else bool(recompute)
    if not model.cqil.groups:
        raise ValueError("the model has no CQIL groups: there is nothing to recover")
    ids = ids.reshape(-1)
    if ids.numel() < window + 1:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one training window of {window} + 1")
    if steps < 1 or batch < 1:
        raise ValueError(f"steps and batch must be >= 1, got {steps}, {batch}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    warmup = min(100, steps // 20) if warmup is None else warmup
    if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup <= steps:
        raise ValueError(f"warmup must be an int in [0, steps = {steps}], got {warmup!r}")
    if not lr > 0:
        raise ValueError(f"the learning rate must be > 0, got {lr!r}")
    plan = dict(schedule=schedule, warmup=warmup, lr=lr, steps=steps)
    last = steps if until is None else until
    if until is not None:
        if isinstance(until, bool) or not isinstance(until, int) or not 1 <= until <= steps:
            raise ValueError(f"until must be an int in [1, steps = {steps}], got {until!r}")
        if checkpoint is None:
            raise ValueError("until needs a checkpoint: the part's end is kept there for the next part to resume")
    layers = sorted({l for g in model.cqil.groups for l in g}) if only_grouped else None
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    adapters = add_lora(model, rank, alpha, layers)
    params = [p for a in adapters.values() for p in (a.lora_A, a.lora_B)]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    log = TrainLog([], [])
    first = 1
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    if resume:
        if checkpoint is None or not checkpoint.exists():
            raise FileNotFoundError(f"no checkpoint to resume from at {checkpoint}")
        state = load_checkpoint(checkpoint, adapters=adapters, optimizer=optimizer, generator=generator)
        if state.get("base") != _base_signature(model) or state["rank"] != rank or state["seed"] != seed:
            raise ValueError(f"{checkpoint} was written for another base model, rank or seed")
        was = state.get("plan", {})
        extends = (schedule == "constant" and isinstance(was, dict) and {**was, "steps": steps} == plan
                   and steps >= was.get("steps", 0))
        if was != plan and not extends:
            raise ValueError(f"{checkpoint} was written by a run with {was}; this one has {plan} (resume with the "
                             f"same --steps, --lr, --warmup and --schedule)")
        log = TrainLog(state["steps"], state["losses"])
        first = state["step"] + 1
        if last < first:
            raise ValueError(f"{checkpoint} is at step {state['step']} already; until = {until} is not past it")

    def save(step: int) -> None:
        save_checkpoint(checkpoint, state=dict(step=step, rank=rank, seed=seed, plan=plan,
                                               base=_base_signature(model), steps=log.steps, losses=log.losses),
                        adapters=adapters, optimizer=optimizer, generator=generator)

    saved_backend, model.backend = model.backend, "torch"
    model.train()
    try:
        with gradient_checkpointing(model) if recompute else contextlib.nullcontext():
            for step in range(first, last + 1):
                starts = torch.randint(0, ids.numel() - window, (batch,), generator=generator)
                x = torch.stack([ids[s:s + window] for s in starts.tolist()]).to(model.device)
                loss = kd_loss(model, x, temperature, ce_weight, autocast_dtype)
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"the distillation loss became {loss.item()} at step {step} (lr "
                                             f"{learning_rate(step, steps, lr, warmup, schedule):g}, temperature "
                                             f"{temperature:g}): lower the learning rate; nothing was saved "
                                             f"from this step")
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step, steps, lr, warmup, schedule)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                log.steps.append(step)
                log.losses.append(loss.item())
                if progress is not None:
                    progress(step, loss.item())
                if checkpoint is not None and (step == last or (checkpoint_every and step % checkpoint_every == 0)):
                    save(step)
    finally:
        model.eval()
        model.backend = saved_backend
    return log


def save_adapter(model, out_dir, base_name: str = "") -> Path:
    """Write the trained adapters as a PEFT LoRA adapter, plus the grouping as cqil.json."""
    from safetensors.torch import save_file

    adapters = model.adapters
    if not adapters:
        raise ValueError("the model has no LoRA adapters to save (run finetune first)")
    bad = [_adapter_name(k) for k, a in adapters.items()
           if not (bool(torch.isfinite(a.lora_A).all()) and bool(torch.isfinite(a.lora_B).all()))]
    if bad:
        raise FloatingPointError(f"adapter {bad[0]} holds NaN or infinite values: not saved")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(adapters.values()))
    rank = first.lora_A.shape[0]
    tensors = {}
    for (l, block, name), a in adapters.items():
        prefix = f"base_model.model.model.layers.{l}.{block}.{name}"
        tensors[f"{prefix}.lora_A.weight"] = a.lora_A.detach().float().cpu().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = a.lora_B.detach().float().cpu().contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    layers = sorted({l for l, _, _ in adapters})
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=rank, lora_alpha=first.scaling * rank,
                  target_modules=sorted({name for _, _, name in adapters}), lora_dropout=0.0, bias="none",
                  fan_in_fan_out=False, use_rslora=False, base_model_name_or_path=base_name,
                  layers_to_transform=layers if len(layers) < len(model.layers) else None)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1) + "\n")
    model.cqil.save(out / "cqil.json")
    return out


def write_log(log: TrainLog, out_dir) -> list[Path]:
    """train_log.json, train_log.csv and (with matplotlib) loss.png in out_dir; returns what was written."""
    out = Path(out_dir)
    (out / "train_log.json").write_text(json.dumps(dict(steps=log.steps, kd_loss=log.losses)) + "\n")
    (out / "train_log.csv").write_text("step,kd_loss\n" + "".join(
        f"{step},{loss:.6g}\n" for step, loss in zip(log.steps, log.losses)))
    written = [out / "train_log.json", out / "train_log.csv"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(log.steps, log.losses, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("KD loss (KL, nats)")
    ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)
    return written + [out / "loss.png"]
