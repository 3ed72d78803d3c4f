"""Autoregressive generation with a preallocated KV cache, and the checks on token inputs.

Works on any model with CQILLlama's interface: `model(input_ids, attention_mask, cache) -> logits` (and
`model.forward_checked`, the same for inputs checked already; where `model.late_input_checks`, it also takes an
InputCheck of values still to be read),
`model.generation_cache(batch, max_seq)` (an empty KV cache and its decode step), `model.argmax(logits)`,
`model.args`, `model.device`.
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
import sys
import warnings

import torch


# Prompt positions per forward of generate's prefill: long prompts go in parts of this size (bounded
# activation memory: a 32k-token prompt's attention scores alone would take gigabytes in one forward).
PREFILL_CHUNK = 4096

# Integer dtypes whose every value is an int64 (the unsigned 16/32/64-bit types have few kernels in torch).
ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_inputs(input_ids, vocab_size: int, attention_mask=None, *, empty_rows: bool = False,
                 device=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input_ids as int64, the mask as bool or None), both on `device` (default input_ids'); TypeError /
    ValueError unless input_ids is a [B, T] integer tensor of tokens in [0, vocab_size) and the mask is
    [B, T] of 0/1, left-padded, with no empty row (unless empty_rows: the first part of a left-padded prompt
    fed to a cache in parts may have one). The values the checks need are read from the device once per
    device the inputs are on (a forward of CUDA tensors waited for the GPU up to four times before its first
    launch); the checks run where the inputs are, before they move."""
    input_ids, attention_mask, _ = check_inputs_late(input_ids, vocab_size, attention_mask, empty_rows=empty_rows,
                                                     device=device, late=False)
    return input_ids, attention_mask


def check_inputs_late(input_ids, vocab_size: int, attention_mask=None, *, empty_rows: bool = False, device=None,
                      late: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, InputCheck | None]:
    """check_inputs, whose value checks are left for later where the inputs are on one CUDA device (and late):
    (input_ids, the mask, an InputCheck whose wait() runs them and raises check_inputs' ValueError). Until
    then the ids may hold any value: what runs on them must be safe for every id (graphs._Bucket.load clamps
    them) and be undone when wait() raises. The type and shape checks raise at once; where the inputs are on
    the host, or not on one CUDA device, so do the value checks (the InputCheck is then None)."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype not in ID_DTYPES:
        raise TypeError(f"input_ids must hold integer token ids (int64, int32, int16, int8 or uint8), got dtype "
                        f"{input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D [batch, seq_len], got shape {tuple(input_ids.shape)}")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)})")
    input_ids = input_ids.long()
    if attention_mask is not None:
        _check_mask_type(attention_mask, input_ids)
    check = None
    if late and input_ids.is_cuda and (attention_mask is None or attention_mask.device == input_ids.device):
        check = InputCheck(input_ids, attention_mask, empty_rows, vocab_size)
    else:
        _raise_for_values(_input_values(input_ids, attention_mask, empty_rows), vocab_size)
    device = input_ids.device if device is None else torch.device(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device=device, dtype=torch.bool)
    return input_ids.to(device), attention_mask, check


def _input_values(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, empty_rows: bool) -> list[int]:
    """[the ids' min, their max, the mask's three flags (_mask_stats; zeros without a mask)], read from the
    device once per device the inputs are on."""
    # min and max written side by side by one reduction (a stack of aminmax's two results was a second launch
    # before the read: each costs a replayed prompt host time before its replay)
    minmax = torch.empty(2, dtype=torch.int64, device=input_ids.device)
    torch.aminmax(input_ids, out=(minmax[0], minmax[1]))
    if attention_mask is None:
        return _read([minmax])[0] + [0, 0, 0]
    ids_values, mask_values = _read([minmax, _mask_stats(attention_mask, empty_rows)])
    return ids_values + mask_values


class InputCheck:
    """check_inputs' value checks of inputs on one CUDA device, run once the work that reads them is queued: the
    constructor only marks where the inputs are ready (an event on their device's current stream); wait() runs
    the checks' reductions on a stream of their own that waits for that mark alone, not for what was queued since
    (a prompt's replay), reads their values and raises as check_inputs does. With the ids on the GPU, check_inputs
    took 40 of the ~130 us a SmolLM2 prompt's forward spent on the host before its replay, on an H100; a first
    form that copied the values to pinned memory before the replay took as long (45 us;
    late_check_pinned_h100_20f0694). Inputs on the host (tests of the late path off a GPU) are checked by wait()
    as they are."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, empty_rows: bool,
                 vocab_size: int):
        self.inputs, self.vocab_size = (input_ids, attention_mask, empty_rows), vocab_size
        self.ready = None
        if input_ids.is_cuda:  # on the stream the inputs were made on: their device's current one
            self.ready = torch.cuda.Event()
            self.ready.record(torch.cuda.current_stream(input_ids.device))

    def wait(self) -> None:
        """ValueError naming the problem, as check_inputs raises it. The host waits for the checks' reductions
        alone (their stream waits for the inputs, not for the work queued after them)."""
        if self.ready is None:
            values = _input_values(*self.inputs)
        else:
            stream = _check_stream(self.inputs[0].device)
            stream.wait_event(self.ready)
            with torch.cuda.stream(stream):
                values = _input_values(*self.inputs)
        _raise_for_values(values, self.vocab_size)


_CHECK_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _check_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream InputCheck.wait runs the checks on (one per device, made at first use)."""
    stream = _CHECK_STREAMS.get(device)
    if stream is None:
        stream = _CHECK_STREAMS.setdefault(device, torch.cuda.Stream(device))
    return stream


def _raise_for_values(values: list[int], vocab_size: int) -> None:
    """check_inputs' value checks of _input_values' values."""
    low, high = values[:2]
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"input_ids holds token id {bad}, outside the vocabulary [0, {vocab_size})")
    _raise_for_mask(*values[2:])


def _check_mask_type(attention_mask, input_ids: torch.Tensor) -> None:
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match "
                         f"input_ids shape {tuple(input_ids.shape)}")


def _mask_stats(attention_mask: torch.Tensor, empty_rows: bool) -> torch.Tensor:
    """[not 0/1 only, a row with no tokens (where not allowed), right padding] as int64, on the mask's device."""
    if attention_mask.dtype == torch.bool:
        mask, not_binary = attention_mask, torch.zeros((), dtype=torch.bool, device=attention_mask.device)
    else:
        mask = attention_mask != 0
        not_binary = ~((attention_mask == 0) | (attention_mask == 1)).all()
    empty = ~mask.any(dim=1).all() if not empty_rows else torch.zeros_like(not_binary)
    right_padded = (mask[:, :-1] & ~mask[:, 1:]).any()
    return torch.stack([not_binary, empty, right_padded]).long()


def _read(stats: list[torch.Tensor]) -> list[list[int]]:
    """Each 1-d int64 tensor of `stats` as a list of ints: one read per device they are on."""
    out: list = [None] * len(stats)
    by_device: dict = {}
    for i, t in enumerate(stats):
        by_device.setdefault(t.device, []).append(i)
    for indices in by_device.values():
        sizes = [stats[i].numel() for i in indices]
        # one tensor (input ids without a mask) is read as it is: a cat would be one more launch before the sync
        flat = (stats[indices[0]] if len(indices) == 1 else torch.cat([stats[i] for i in indices])).long().tolist()
        for i, n in zip(indices, sizes):
            out[i], flat = flat[:n], flat[n:]
    return out


def _raise_for_mask(not_binary: int, empty: int, right_padded: int) -> None:
    if not_binary:
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    if empty:
        raise ValueError("attention_mask has a row with no tokens")
    if right_padded:
        raise ValueError("attention_mask must be left-padded (zeros only before a row's first token); "
                         "right padding is not supported")


def check_logits_to_keep(value) -> int:
    """forward()'s logits_to_keep: an int >= 0 (0 = every position)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"logits_to_keep must be an int >= 0 (0: every position), got {value!r}")
    return value


def check_prefill_chunk(value) -> int | None:
    """generate()'s prefill_chunk: an int >= 1, or None (the whole prompt in one forward)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"prefill_chunk must be an int >= 1 or None (the whole prompt at once), got {value!r}")
    return value


def _eos_set(eos_token_id, vocab_size: int) -> list[int]:
    """The eos ids as a list of ints: an int (numpy and 0-d tensor integers too), or a list / tuple /
    1-d tensor of them."""
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, torch.Tensor):
        if eos_token_id.dim() > 1 or eos_token_id.dtype not in ID_DTYPES:
            raise ValueError(f"eos_token_id must be a token id or a list of them, got a tensor of shape "
                             f"{tuple(eos_token_id.shape)} and dtype {eos_token_id.dtype}")
        eos_token_id = eos_token_id.tolist()
    many = isinstance(eos_token_id, (list, tuple))
    ids = []
    for i in (eos_token_id if many else [eos_token_id]):
        try:
            if isinstance(i, bool):
                raise TypeError
            value = operator.index(i)  # int, numpy integers; not floats or strings
        except TypeError:
            raise ValueError(f"eos_token_id {i!r} is not a token id (an int)") from None
        if not 0 <= value < vocab_size:
            raise ValueError(f"eos_token_id {value} is not a token id in [0, {vocab_size})")
        ids.append(value)
    if many and not ids:
        raise ValueError("eos_token_id is an empty list (pass None for no eos)")
    return ids


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def sample_next(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
                top_p: float | None, generator: torch.Generator | None, argmax=None) -> torch.Tensor:
    """logits: [B, vocab] -> next tokens [B] (argmax, or a draw after temperature / top-k / top-p).
    argmax: logits -> tokens for greedy decoding (default torch's; the model's may be a fused kernel)."""
    if not do_sample:
        return argmax(logits) if argmax is not None else logits.argmax(dim=-1)
    # Shift by the row maximum before scaling, so that a tiny temperature sends the other logits to -inf
    # (a greedy draw) instead of the maximum to inf (NaN probabilities).
    logits = logits.float()
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the top token always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_generate_args(args, device, input_ids, max_new_tokens, *, do_sample, temperature, top_k, top_p,
                        eos_token_id, attention_mask, generator, seed, prefill_chunk=None, late=False):
    """Check generate()'s arguments (ValueError/TypeError naming the problem) before any work.
    Returns (input_ids on device, attention_mask as bool or None, generator or None, eos ids, an InputCheck of
    the prompt's values still to be read or None: only with late, check_inputs_late)."""
    check_prefill_chunk(prefill_chunk)
    input_ids, attention_mask, check = check_inputs_late(input_ids, args.vocab_size, attention_mask, device=device,
                                                         late=late)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    prompt_len = input_ids.shape[1]
    total = prompt_len + max_new_tokens
    if total > args.max_position_embeddings:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
            f"max_position_embeddings ({args.max_position_embeddings})")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    ignored = sampling_set(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, generator=generator)
    if ignored and not do_sample:  # as transformers does: a user who set them meant to sample
        warnings.warn(f"{', '.join(ignored)} set the sampling, which runs only with do_sample=True: this call is "
                      "greedy", UserWarning, stacklevel=_callers_level())
    if do_sample:
        if not (_number(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0 when sampling, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
        if top_p is not None and not (_number(top_p) and 0 < top_p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
        if generator is not None and seed is not None:
            raise ValueError("pass either generator or seed, not both")
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        if generator is not None and generator.device.type != torch.device(device).type:
            raise ValueError(f"generator is on {generator.device}, the model on {device}")
    return input_ids, attention_mask, generator, _eos_set(eos_token_id, args.vocab_size), check


# The sampling arguments and their defaults (greedy): generate's, cqil generate's flags, the ranks' greedy payload
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": None, "top_p": None, "seed": None, "generator": None}


def sampling_set(**values) -> list[str]:
    """The names, in SAMPLING_DEFAULTS' order, of the sampling arguments given away from their defaults (a number
    equal to its default counts as unset)."""
    return [name for name, default in SAMPLING_DEFAULTS.items()
            if name in values and values[name] is not default
            and not (_number(values[name]) and values[name] == default)]


def _callers_level() -> int:
    """warnings.warn's stacklevel for the first frame outside this package and torch's decorators (the caller of
    generate or stream, however many wrappers are between)."""
    inside = (os.path.dirname(os.path.abspath(__file__)), os.path.join("torch", "utils", "_contextlib.py"))
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith(inside[0])
                                 or frame.f_code.co_filename.endswith(inside[1])):
        frame, level = frame.f_back, level + 1
    return level


def check_warm_up_args(args, batch, max_seq, prompt_lengths) -> tuple[int, list[int]]:
    """warm_up()'s arguments checked (ValueError naming the problem): (max_seq, default max_position_embeddings;
    the prompt lengths, default every length one forward takes up to min(max_seq - 1, PREFILL_CHUNK))."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    limit = args.max_position_embeddings
    max_seq = limit if max_seq is None else max_seq
    if isinstance(max_seq, bool) or not isinstance(max_seq, int) or not 2 <= max_seq <= limit:
        raise ValueError(f"max_seq must be an int in [2, max_position_embeddings = {limit}], got {max_seq!r}")
    if prompt_lengths is None:
        prompt_lengths = range(1, min(max_seq - 1, PREFILL_CHUNK) + 1)
    lengths = list(prompt_lengths)
    bad = [T for T in lengths if isinstance(T, bool) or not isinstance(T, int) or not 1 <= T < max_seq]
    if bad or not lengths:
        raise ValueError(f"prompt_lengths must be ints in [1, max_seq - 1 = {max_seq - 1}] (a prompt and at least "
                         f"one new token), got {repr(bad[0]) if bad else 'none'}")
    return max_seq, lengths


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache,
            chunk: int | None = PREFILL_CHUNK, checked: bool = False, check: InputCheck | None = None) -> torch.Tensor:
    """Append the prompt to `cache`, `chunk` positions per forward (None: all at once), and return the
    last position's logits [B, vocab]. Only the last position reaches the lm_head; the activations of one
    forward are bounded by the chunk, not the prompt. checked: the inputs are as check_inputs returns them,
    checked for the whole prompt (generate's): the parts skip forward()'s own check, a read of the device;
    check: the whole prompt's values still to be read (check_inputs_late), which the first part's forward
    waits for (model.forward_checked)."""
    T = input_ids.shape[1]
    step = T if chunk is None else chunk
    for begin in range(0, T, step):
        part = slice(begin, begin + step)
        ids, mask = input_ids[:, part], None if attention_mask is None else attention_mask[:, part]
        if checked:
            logits = (model.forward_checked(ids, mask, cache, 1) if check is None
                      else model.forward_checked(ids, mask, cache, 1, check))
            check = None
        else:
            logits = model(ids, mask, cache=cache, logits_to_keep=1)
    return logits[:, -1]


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id=None, attention_mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None, seed: int | None = None,
             prefill_chunk: int | None = PREFILL_CHUNK) -> torch.Tensor:
    """See CQILLlama.generate."""
    input_ids, steps = _checked_steps(model, input_ids, max_new_tokens, do_sample=do_sample, temperature=temperature,
                                      top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                                      attention_mask=attention_mask, generator=generator, seed=seed,
                                      prefill_chunk=prefill_chunk, late=getattr(model, "late_input_checks", False))
    return torch.cat([input_ids, *(tokens[:, None] for tokens in steps)], dim=1)


def stream(model, input_ids: torch.Tensor, max_new_tokens: int, *, do_sample: bool = False,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           eos_token_id=None, attention_mask: torch.Tensor | None = None,
           generator: torch.Generator | None = None, seed: int | None = None,
           prefill_chunk: int | None = PREFILL_CHUNK):
    """See CQILLlama.stream. The arguments are checked here, before the iterator is returned."""
    _, steps = _checked_steps(model, input_ids, max_new_tokens, do_sample=do_sample, temperature=temperature,
                              top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, attention_mask=attention_mask,
                              generator=generator, seed=seed, prefill_chunk=prefill_chunk)
    return _on_host(steps, model.device)


def _checked_steps(model, input_ids, max_new_tokens, *, do_sample, temperature, top_k, top_p, eos_token_id,
                   attention_mask, generator, seed, prefill_chunk, late=False):
    """generate's and stream's arguments checked (check_generate_args), then (input_ids on the model's device,
    new_tokens' generator of steps, not yet started). late: the prompt's values may be read by its first forward
    (a model whose forward_checked takes an InputCheck: generate's; stream's checks all raise before it returns)."""
    input_ids, attention_mask, generator, eos, check = check_generate_args(
        model.args, model.device, input_ids, max_new_tokens, do_sample=do_sample, temperature=temperature,
        top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, attention_mask=attention_mask,
        generator=generator, seed=seed, prefill_chunk=prefill_chunk, late=late)
    return input_ids, new_tokens(model, input_ids, attention_mask, max_new_tokens, do_sample=do_sample,
                                 temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, eos=eos,
                                 prefill_chunk=prefill_chunk, check=check)


@torch.inference_mode()  # on a generator: every resumption runs in inference mode, wherever it is resumed
def _on_host(steps, device):
    """Each step's tokens [B] as a CPU tensor. On CUDA a step's tokens are copied to pinned memory without
    waiting, and handed out only once the next step is queued behind them (as _FinishWatch reads eos flags):
    the GPU computes the next token while the host takes this one."""
    cuda = torch.device(device).type == "cuda"
    steps = iter(steps)
    tokens = next(steps, None)
    while tokens is not None:
        if cuda:
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        else:
            host, copied = tokens, None
        tokens = next(steps, None)  # the next step queued (a decode step, its sampling)
        if copied is not None:
            copied.synchronize()
        yield host


@contextlib.contextmanager
def generation_slot(model, batch: int, max_seq: int):
    """model.generation_cache(batch, max_seq), (an empty KV cache of at least max_seq positions, its decode step),
    for the body of a with: the cache is marked busy (KVCache.busy) until the body ends, however it ends, so that
    no other call takes it from generate's kept caches (graphs.DecodeSlots) meanwhile, and every later one may."""
    cache, decode = model.generation_cache(batch, max_seq)
    cache.busy = True
    try:
        yield cache, decode
    finally:
        cache.busy = False


def new_tokens(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int, *,
               do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
               generator: torch.Generator | None, eos: list[int], prefill_chunk: int | None,
               check: InputCheck | None = None):
    """generate's loop on checked arguments (check_generate_args; check: the prompt's values still to be read,
    which its first forward waits for): yields each step's new tokens [B] on the
    device, at most max_new_tokens steps, ending once every row has finished (a finished row's tokens are its
    eos); the next step is queued when the generator is resumed. The cache it runs in is marked busy until the
    loop ends or is dropped, so that a later call meanwhile (a stream not yet exhausted, then another one) does
    not take it from generate's kept caches (graphs.DecodeSlots) while it is in use."""
    batch, prompt_len = input_ids.shape
    with generation_slot(model, batch, prompt_len + max_new_tokens) as (cache, decode):
        logits = prefill(model, input_ids, attention_mask, cache, prefill_chunk, checked=True, check=check)
        # what only the steps need is made once the prompt is queued: its host time is not the first token's
        if eos:
            cuda = model.device.type == "cuda"
            eos_tensor = torch.tensor(eos, dtype=torch.long, pin_memory=cuda).to(model.device, non_blocking=cuda)
            finished = torch.zeros(batch, dtype=torch.bool, device=model.device)
            watch = _FinishWatch(max_new_tokens, model.device)
        for step in range(max_new_tokens):
            next_tokens = sample_next(logits, do_sample, temperature, top_k, top_p, generator, model.argmax)
            if eos:
                next_tokens = torch.where(finished, eos_tensor[0], next_tokens)
                finished |= torch.isin(next_tokens, eos_tensor)
                watch.record(step, finished)
                if watch.finished(step - 1):  # every row had finished a step ago: this step's tokens go
                    return
            yield next_tokens
            if step == max_new_tokens - 1:
                return
            logits = decode(next_tokens)


class _FinishWatch:
    """Whether every row had finished by a step, read on the host one step late: the flag of step s is
    copied to the host without waiting, and read at step s + 1, by which time the GPU has step s + 1's
    decode queued behind it, so the check never leaves the GPU idle (reading it at once made the host wait
    for each step before enqueueing the next). generate thus runs one decode step past the last row's eos
    and drops its tokens: the output is the same. Every rank of a multi-GPU run stops at the same step, as
    the reductions inside the decode step need."""

    def __init__(self, steps: int, device: torch.device):
        cuda = torch.device(device).type == "cuda"
        self.flags = torch.zeros(steps, dtype=torch.bool, pin_memory=cuda)
        self.events = [torch.cuda.Event() for _ in range(2)] if cuda else None

    def record(self, step: int, finished: torch.Tensor) -> None:
        self.flags[step].copy_(finished.all(), non_blocking=self.events is not None)
        if self.events is not None:
            self.events[step % 2].record()

    def finished(self, step: int) -> bool:
        """Whether every row had finished at `step` (recorded before; False for step < 0)."""
        if step < 0:
            return False
        if self.events is not None:
            self.events[step % 2].synchronize()
        return bool(self.flags[step])
