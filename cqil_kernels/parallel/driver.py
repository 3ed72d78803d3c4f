"""Driving P ranks from one ordinary Python process: ParallelCQILLlama.

`CQILLlama.from_pretrained(src, cqil=..., devices=[0, 1])` starts one worker process per device (spawned,
so it works from notebooks and from processes that already use CUDA; a script needs the usual
`if __name__ == "__main__":` guard), each a rank (rank.py) of a
torch.distributed group (NCCL on GPUs, gloo for devices=["cpu", "cpu", ...]); this process is not a rank
and never enters a collective, so it cannot hang in one. Each call (forward, generate, ...) is checked
here first (bad input raises here, with the workers untouched), then sent to every rank; rank 0 sends the
result back. generate() runs its whole loop inside the ranks (one round trip per call, not per token);
stream() too, rank 0 sending each step's tokens as it comes, the driver reading them as they are asked for
(no other call is taken while a stream is open; one closed early is read to its end first).

Faults: the driver waits on the workers' replies and on their process handles together, so a rank that
raises or dies makes the call raise at once, with that rank's error and traceback; the other workers are
then terminated (a rank blocked in a collective with a dead peer cannot be woken otherwise) and the model
is closed. A rank that stops without dying (SIGSTOP, a hang in native code that holds the GIL) stops its
heartbeat, a thread that stamps the time into shared memory every HEARTBEAT_INTERVAL_S: after
heartbeat_timeout_s without one, the call fails the same way. Every call has a time limit too
(timeout_s; start-up has its own, start_timeout_s). A request the ranks refuse before any collective runs
(a KV cache that was released, one too large to allocate) raises in the driver and leaves the model
usable. close() (or leaving a `with` block, or interpreter exit) stops the workers.
"""

from __future__ import annotations

import atexit
import itertools
import multiprocessing as mp
import os
import tempfile
import time
import traceback
import warnings
import weakref
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch

from ..config import CQILConfig
from ..generation import (PREFILL_CHUNK, SAMPLING_DEFAULTS, check_generate_args, check_inputs, check_logits_to_keep,
                          check_warm_up_args, stream)
from ..graphs import warm_up_buckets
from .launch import disable_multicast

START_TIMEOUT_S = 600.0  # loading (and for CUDA, creating contexts); a dead worker is noticed at once
CALL_TIMEOUT_S = 900.0  # one forward / generate / ... call, unless the model is built with another limit
HEARTBEAT_INTERVAL_S = 0.5
# A rank's heartbeat thread needs the GIL: native code that holds it (a Triton compile of one kernel takes
# a few seconds) delays the beat, so the limit is generous.
HEARTBEAT_TIMEOUT_S = 60.0


class RankError(RuntimeError):
    """A rank failed; `rank` says which, the message carries its traceback."""

    def __init__(self, rank: int, message: str):
        super().__init__(message)
        self.rank = rank


@dataclass(eq=False)
class RemoteCache:
    """A KV cache that lives in the ranks (ParallelCQILLlama.new_cache); pass it to forward(cache=...).
    Its memory in the ranks is freed by release_cache(), or once this handle is garbage-collected."""

    id: int
    batch: int
    max_seq: int
    length: int = 0


class _Refused(Exception):
    """Raised in a rank for a request refused before any collective ran (every rank refuses it alike, or
    the request has no collective at all): the driver re-raises `error` and the ranks go on serving."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def check_devices(devices) -> list[torch.device]:
    """The device list of an in-process multi-rank model, or ValueError/TypeError before any process
    starts: at least 2 entries, all CUDA or all "cpu", no CUDA index twice, none beyond the visible GPUs."""
    if isinstance(devices, (str, int, torch.device)) or not hasattr(devices, "__iter__"):
        raise TypeError(f"devices must be a list of devices (e.g. [0, 1] or ['cpu', 'cpu']), got {devices!r}")
    out = []
    for d in devices:
        if isinstance(d, bool):
            raise TypeError(f"devices: {d!r} is not a device")
        try:
            out.append(torch.device("cuda", d) if isinstance(d, int) else torch.device(d))
        except (RuntimeError, TypeError):
            raise ValueError(f"devices: {d!r} is not a device") from None
    if len(out) < 2:
        raise ValueError(f"devices needs at least 2 entries (one rank each), got {len(out)}")
    kinds = {d.type for d in out}
    if len(kinds) > 1 or not kinds <= {"cpu", "cuda"}:
        raise ValueError(f"devices must be all CUDA devices or all 'cpu', got {[str(d) for d in out]}")
    if kinds == {"cuda"}:
        out = [torch.device("cuda", d.index if d.index is not None else 0) for d in out]
        seen = [d.index for d in out]
        twice = sorted({i for i in seen if seen.count(i) > 1})
        if twice:
            raise ValueError(f"devices lists GPU {twice[0]} more than once (one rank per GPU)")
        visible = torch.cuda.device_count()
        beyond = [i for i in seen if i >= visible]
        if beyond:
            raise ValueError(f"devices lists GPU {beyond[0]}, but {visible} GPU(s) are visible")
    return out


def _check_placement(src, cqil, world: int, tensor_parallel: bool) -> None:
    """ValueError before any process starts when the model cannot be placed on `world` ranks (group sizes,
    heads or intermediate size that do not divide): read from the checkpoint's config, no weights."""
    from ..checkpoint import read_args, resolve_cqil
    from .placement import Placement

    try:
        args = read_args(src)
    except ImportError:  # a GGUF without the gguf package: the ranks say so
        return
    Placement.build(0, world, args, resolve_cqil(cqil, args.extra) or CQILConfig(), tensor_parallel)


class ParallelCQILLlama:
    """A CQILLlama whose group layers run on several devices, driven from this process.

    Use it like a CQILLlama: model(input_ids, attention_mask) -> logits, model.generate(...),
    model.new_cache(batch, max_seq) for incremental forward calls. Results come back on `output_device`
    (default: the first device). `memory_per_rank` lists the bytes of weights each rank holds.
    """

    def __init__(self, src, cqil=None, *, devices, dtype=None, lora=None, backend: str = "auto",
                 one_shot: bool | None = None, output_device=None, timeout_s: float | None = CALL_TIMEOUT_S,
                 start_timeout_s: float | None = START_TIMEOUT_S,
                 heartbeat_timeout_s: float | None = HEARTBEAT_TIMEOUT_S,
                 bypass_exchange: str = "all_reduce", microbatch_rows: int = 512, tensor_parallel: bool = False):
        """tensor_parallel: split layers over the ranks too (parallel/placement.py): with no groups pure
        tensor parallelism, with groups the hybrid. timeout_s: the time limit of each call (None: none);
        start_timeout_s: of loading the ranks; heartbeat_timeout_s: how long a rank may go without a
        heartbeat during a call (None: not watched). On any of them the call raises RankError and the
        ranks are stopped."""
        from .rank import check_bypass_exchange, check_microbatch_rows

        check_bypass_exchange(bypass_exchange)
        check_microbatch_rows(microbatch_rows)
        if not isinstance(tensor_parallel, bool):
            raise TypeError(f"tensor_parallel must be True or False, got {tensor_parallel!r}")
        if tensor_parallel and bypass_exchange == "p2p":
            raise ValueError("bypass_exchange='p2p' is not supported with tensor_parallel=True (use 'all_reduce')")
        for name, value in (("timeout_s", timeout_s), ("start_timeout_s", start_timeout_s),
                            ("heartbeat_timeout_s", heartbeat_timeout_s)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not value > 0):
                raise ValueError(f"{name} must be a number of seconds > 0 or None, got {value!r}")
        self.devices = check_devices(devices)
        self.world = len(self.devices)
        if isinstance(src, torch.nn.Module):
            raise TypeError("with devices=[...], src must be a checkpoint path (a directory or .gguf file) "
                            "that every rank process can read, not a model object")
        if not isinstance(src, (str, os.PathLike)):
            raise TypeError(f"src must be a checkpoint path, got {type(src).__name__}")
        if not Path(src).exists():
            raise FileNotFoundError(f"{src}: no such checkpoint directory or file")
        _check_placement(src, cqil, self.world, tensor_parallel)
        self.timeout_s, self.heartbeat_timeout_s = timeout_s, heartbeat_timeout_s
        self.output_device = torch.device(output_device) if output_device is not None else self.devices[0]
        self._closed = True
        self._streaming = False  # a stream is open (_streamed): no other call until it ends
        self._ids = itertools.count(1)
        self._live_caches: set[int] = set()
        self._dropped_caches: list[int] = []  # handles collected without release_cache(): freed on the next call
        self._cache_finalizers: dict[int, weakref.finalize] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="cqil-rdzv-")
        ctx = mp.get_context("spawn")
        backend_name = "nccl" if self.devices[0].type == "cuda" else "gloo"
        load = dict(src=str(src), cqil=cqil, dtype=dtype, lora=str(lora) if lora is not None else None,
                    backend=backend, one_shot=one_shot, bypass_exchange=bypass_exchange,
                    microbatch_rows=microbatch_rows, tensor_parallel=tensor_parallel)
        init = f"file://{self._tmp.name}/store"
        self._conns, self._procs = [], []
        self._beats = ctx.Array("d", self.world, lock=False)  # each rank's last heartbeat (time.monotonic)
        disable_multicast()  # the spawned ranks inherit the environment
        for rank, device in enumerate(self.devices):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, daemon=True, name=f"cqil-rank{rank}",
                               args=(rank, self.world, str(device), backend_name, init, load, child, self._beats))
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        self._closed = False
        self._finalizer = weakref.finalize(self, _shutdown, self._conns, self._procs, self._tmp)
        atexit.register(self._finalizer)
        info, _ = self._collect("start", start_timeout_s, watch_heartbeats=False)
        self.args, self._cqil = info[0]["args"], info[0]["cqil"]
        self.dtype = info[0]["dtype"]
        self.memory_per_rank = [i["parameter_bytes"] for i in info]
        self.tensor_parallel = tensor_parallel
        if not self._cqil.groups and not tensor_parallel:
            warnings.warn("this model has no CQIL groups: every device runs the whole model and nothing "
                          "runs concurrently; load it on one device, pass cqil=, or tensor_parallel=True", stacklevel=3)

    # ----------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.output_device

    @property
    def cqil(self):
        return self._cqil

    @cqil.setter
    def cqil(self, value) -> None:
        raise AttributeError("the grouping of a multi-device model is fixed when it is loaded (it decides "
                             "which layers each device holds); load it again with another cqil")

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running"
        return (f"ParallelCQILLlama({self.args.num_hidden_layers} layers, {self._cqil}, devices="
                f"{[str(d) for d in self.devices]}, {state})")

    def __enter__(self) -> ParallelCQILLlama:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the rank processes (idempotent)."""
        if not self._closed:
            self._closed = True
            self._finalizer()

    def __call__(self, input_ids, attention_mask=None, cache: RemoteCache | None = None,
                 logits_to_keep: int = 0) -> torch.Tensor:
        return self.forward(input_ids, attention_mask, cache, logits_to_keep)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: RemoteCache | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """CQILLlama.forward: input_ids [B, T] -> logits [B, T, vocab] on output_device."""
        input_ids, attention_mask = check_inputs(input_ids, self.args.vocab_size, attention_mask,
                                                 empty_rows=cache is not None)
        check_logits_to_keep(logits_to_keep)
        if attention_mask is not None:
            attention_mask = attention_mask.cpu()
        B, T = input_ids.shape
        if cache is not None:
            if not isinstance(cache, RemoteCache):
                raise TypeError(f"cache must come from this model's new_cache(), got {type(cache).__name__}")
            if cache.id not in self._live_caches:
                raise ValueError(f"KV cache {cache.id} was released (release_cache) or made by another model")
            if B != cache.batch:
                raise ValueError(f"input batch {B} does not match the KV cache's batch {cache.batch}")
            if cache.length + T > cache.max_seq:
                raise ValueError(f"{cache.length + T} positions exceed the KV cache ({cache.max_seq})")
        elif T > self.args.max_position_embeddings:
            raise ValueError(f"{T} positions exceed max_position_embeddings ({self.args.max_position_embeddings})")
        logits = self._call("forward", input_ids=input_ids.cpu(), attention_mask=attention_mask,
                            cache=cache.id if cache is not None else None, logits_to_keep=logits_to_keep)
        if cache is not None:
            cache.length += T
        return logits.to(self.output_device)

    def new_cache(self, batch: int, max_seq: int) -> RemoteCache:
        for name, value in (("batch", batch), ("max_seq", max_seq)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if max_seq > self.args.max_position_embeddings:
            raise ValueError(f"a cache of {max_seq} positions exceeds max_position_embeddings "
                             f"({self.args.max_position_embeddings})")
        cache = RemoteCache(next(self._ids), batch, max_seq)
        self._call("new_cache", id=cache.id, batch=batch, max_seq=max_seq)
        self._live_caches.add(cache.id)
        # the finalizer must not hold the model: it only queues the id for the next call to free
        self._cache_finalizers[cache.id] = weakref.finalize(cache, self._dropped_caches.append, cache.id)
        return cache

    def release_cache(self, cache: RemoteCache) -> None:
        """Free a cache's memory in the ranks (also done when the handle is garbage-collected)."""
        if not isinstance(cache, RemoteCache):
            raise TypeError(f"cache must come from this model's new_cache(), got {type(cache).__name__}")
        if cache.id not in self._live_caches:
            raise ValueError(f"KV cache {cache.id} was already released or made by another model")
        self._cache_finalizers.pop(cache.id).detach()
        self._live_caches.discard(cache.id)
        self._call("release_cache", id=cache.id)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | list[int] | None = None, attention_mask: torch.Tensor | None = None,
                 seed: int | None = None, generator=None, prefill_chunk: int | None = PREFILL_CHUNK) -> torch.Tensor:
        """CQILLlama.generate, run inside the ranks. Sampling is seeded with `seed` in every rank (a
        torch.Generator cannot be shared with other processes: pass seed instead)."""
        payload = self._generate_payload(input_ids, max_new_tokens, do_sample, temperature, top_k, top_p,
                                         eos_token_id, attention_mask, seed, generator, prefill_chunk)
        return self._call("generate", **payload).to(self.output_device)

    def stream(self, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool = False,
               temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
               eos_token_id: int | list[int] | None = None, attention_mask: torch.Tensor | None = None,
               seed: int | None = None, generator=None, prefill_chunk: int | None = PREFILL_CHUNK):
        """CQILLlama.stream, run inside the ranks: rank 0 sends each step's tokens [B] (CPU) as it is made.
        The arguments are checked here, when stream is called; the ranks start at the first step asked for.
        While a stream is open (not exhausted, closed or dropped) the model takes no other call. The time limit
        (timeout_s) holds for each step. The ranks run ahead of the reader by as many steps as the pipe between
        them holds, then wait; left unread past the collectives' 10-minute limit, they fail."""
        payload = self._generate_payload(input_ids, max_new_tokens, do_sample, temperature, top_k, top_p,
                                         eos_token_id, attention_mask, seed, generator, prefill_chunk)
        return self._streamed(payload)

    def _generate_payload(self, input_ids, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id,
                          attention_mask, seed, generator, prefill_chunk) -> dict:
        """generate's and stream's arguments checked here and made ready for the ranks."""
        if generator is not None:
            raise ValueError("a multi-device model samples in its rank processes: pass seed=..., not generator")
        kwargs = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                      eos_token_id=eos_token_id, seed=seed, prefill_chunk=prefill_chunk)
        if do_sample and seed is None:
            kwargs["seed"] = int(torch.randint(0, 2**62, ()).item())  # one draw, the same in every rank
        input_ids, attention_mask, _, eos, _ = check_generate_args(
            self.args, "cpu", input_ids, max_new_tokens, attention_mask=attention_mask, generator=None,
            **kwargs)
        kwargs["eos_token_id"] = eos or None  # plain ints for the ranks
        if not do_sample:  # ignored (check_generate_args warned here): the ranks would warn again
            kwargs.update({name: default for name, default in SAMPLING_DEFAULTS.items() if name in kwargs})
        return dict(input_ids=input_ids, max_new_tokens=max_new_tokens, attention_mask=attention_mask, **kwargs)

    def _streamed(self, payload: dict):
        """The stream's steps as rank 0 sends them (started at the first one asked for). Closed or dropped
        before its end, the rest is read and dropped, so that the next call starts clean."""
        self._send("stream", payload)
        self._streaming = True
        steps = self._messages("stream", self.timeout_s, True)
        finished = False
        try:
            while True:
                if self._closed:
                    raise RuntimeError("this model was closed while its stream was open")
                try:
                    tokens = next(steps)
                except StopIteration:
                    finished = True
                    return
                yield torch.tensor(tokens, dtype=torch.long)  # [B]: rank 0 sends each step's as a list
        except GeneratorExit:
            raise
        except BaseException:
            self._shutdown_all()  # interrupted or failed while the ranks work: their state is unknown
            raise
        finally:
            self._streaming = False
            if not finished and not self._closed:
                try:
                    _run_out(steps)
                except BaseException:
                    self._shutdown_all()
                    raise

    def warm_up(self, batch: int = 1, max_seq: int | None = None, prompt_lengths=None) -> list[int]:
        """CQILLlama.warm_up, in every rank (their decode steps and prompt buckets captured with their
        reductions); [] where the ranks capture nothing (CPU ranks, the torch backend)."""
        max_seq, lengths = check_warm_up_args(self.args, batch, max_seq, prompt_lengths)
        return self._call("warm_up", batch=batch, max_seq=max_seq, lengths=lengths)

    def rank_stats(self) -> list[dict]:
        """Every rank's RankModel.stats() with its rank: device, parameter bytes, peak device memory,
        group reductions by path (and the last fallback reason), bypass exchange, decode in a graph, the
        KV caches it holds for the caller (kv_caches, kv_cache_bytes) and those generate keeps with their
        decode graphs (kept_kv_cache_bytes)."""
        return self._call("stats", all_ranks=True)

    # ----------------------------------------------------------------------------------------------

    def _call(self, command: str, all_ranks: bool = False, **payload) -> Any:
        self._send(command, payload)
        results, refused = self._collect(command, self.timeout_s)
        if refused:
            if command == "new_cache":  # the ranks that made it free it again: no rank keeps a cache the driver lacks
                self._call("release_cache", id=payload["id"])
            rank, error = min(refused, key=lambda r: r[0])
            raise type(error)(f"rank {rank}: {error}") from None
        return results if all_ranks else results[0]

    def _send(self, command: str, payload: dict) -> None:
        """Send a command to every rank (with the caches whose handles were dropped, to free)."""
        if self._closed:
            raise RuntimeError("this model is closed (close() was called, or a rank failed)")
        if self._streaming:
            raise RuntimeError("a stream of this model is still open: iterate it to its end or close() it first")
        dropped = []
        while self._dropped_caches:
            cache_id = self._dropped_caches.pop()
            if cache_id in self._live_caches:
                self._live_caches.discard(cache_id)
                self._cache_finalizers.pop(cache_id, None)
                dropped.append(cache_id)
        for conn in self._conns:
            try:
                conn.send((command, dict(payload, release=dropped)))
            except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
                pass  # the worker is gone; _collect reports which and why

    def _collect(self, command: str, timeout_s: float | None, watch_heartbeats: bool = True):
        """(every rank's reply to `command`, [(rank, error) of the ranks that refused it]); RankError as
        soon as one fails, dies or stops beating (then all stop). Interrupted (Ctrl-C) while the ranks
        work, the model is closed: the ranks' state is unknown."""
        try:
            return self._replies(command, timeout_s, watch_heartbeats)
        except BaseException:
            self._shutdown_all()
            raise

    def _silent_rank(self, ranks) -> tuple[int, float] | None:
        """(rank, seconds since its last heartbeat) of the first of `ranks` past heartbeat_timeout_s."""
        if self.heartbeat_timeout_s is None:
            return None
        now = time.monotonic()
        for rank in sorted(ranks):
            beat = self._beats[rank]
            if beat and now - beat > self.heartbeat_timeout_s:
                return rank, now - beat
        return None

    def _replies(self, command: str, timeout_s: float | None, watch_heartbeats: bool):
        messages = self._messages(command, timeout_s, watch_heartbeats)
        while True:
            try:
                next(messages)
            except StopIteration as stop:
                return stop.value
            self._fail(f"{command}: rank 0 sent a stream's step outside a stream", 0)

    def _messages(self, command: str, timeout_s: float | None, watch_heartbeats: bool):
        """Read every rank's reply to `command`, failing as _collect says; yields each step rank 0 sends before
        its reply (a stream's), the time limit counted anew from each resumption. Returns (results, refused)."""
        pending = dict(enumerate(self._conns))
        results: list = [None] * self.world
        refused: list = []
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        sentinels = {proc.sentinel: rank for rank, proc in enumerate(self._procs)}
        watch = watch_heartbeats and self.heartbeat_timeout_s is not None
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            if watch:  # wake at least every second to look at the heartbeats
                timeout = 1.0 if timeout is None else min(timeout, 1.0)
            ready = wait(list(pending.values()) + list(sentinels), timeout=timeout)
            if not ready:
                silent = self._silent_rank(pending) if watch else None
                if silent is not None:
                    rank, quiet = silent
                    self._fail(f"{command}: rank {rank} (pid {self._procs[rank].pid}) stopped responding: no "
                               f"heartbeat for {quiet:.0f} s (stopped, or hung in native code)", rank)
                if deadline is not None and time.monotonic() >= deadline:
                    self._fail(f"{command}: no reply from rank(s) {sorted(pending)} within {timeout_s} s", -1)
                continue
            for obj in ready:
                rank = next((r for r, c in pending.items() if c is obj), None)
                if rank is not None:
                    try:
                        status, value = obj.recv()
                    except (EOFError, OSError):  # it exited without a word
                        yield from self._fail_first(pending, rank, ("died", self._death(rank), None))
                    if status == "step":
                        yield value
                        deadline = None if timeout_s is None else time.monotonic() + timeout_s
                        continue
                    if status == "error":
                        exc = value[0]
                        if command == "start" and isinstance(exc, (ValueError, TypeError, FileNotFoundError)):
                            self._shutdown_all()
                            raise type(exc)(f"rank {rank}: {exc}") from None
                        yield from self._fail_first(pending, rank, self._raised(rank, value))
                    if status == "refused":
                        refused.append((rank, value))
                    results[rank] = value
                    del pending[rank]
                else:  # a rank exited: while a call is in flight, that is a failure
                    rank = sentinels[obj]
                    if rank in pending and pending[rank].poll():  # its last words are in the pipe: read first
                        continue
                    yield from self._fail_first(pending, rank, ("died", self._death(rank), None))
        return results, refused

    def _fail_first(self, pending: dict, rank: int, failure: tuple, grace_s: float = 0.5):
        """Fail the call, `rank` having failed (failure: _raised's, or ("died", its death, None)), once what the
        other ranks still pending had sent is read: a stream's steps (yielded: a user gets every step made before
        the failure) and their own failures, waiting up to grace_s for those still running to fail or exit.

        A collective that loses its peer raises in the survivor too, and which of the two reaches the driver
        first is a race. The failure reported is a rank that exited without a word (crashed or killed: not
        something a peer's failure makes happen), else the error raised first (ranks stamp their errors with the
        host's monotonic clock, which all of them share); the others' follow it in the message. A survivor that
        neither raises nor exits within grace_s (blocked in a collective that does not notice, NCCL's) is stopped
        with the rest."""
        failures = {rank: failure}
        others = {r: conn for r, conn in pending.items() if r != rank}
        deadline = time.monotonic() + grace_s
        while others:
            ready = wait(list(others.values()) + [self._procs[r].sentinel for r in others],
                         timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for r in list(others):
                conn = others[r]
                if conn.poll():
                    try:
                        status, value = conn.recv()
                    except (EOFError, OSError):
                        failures[r] = ("died", self._death(r), None)
                        del others[r]
                        continue
                    if status == "step":
                        yield value
                        continue
                    if status == "error":
                        failures[r] = self._raised(r, value)
                    del others[r]  # failed, or done (its reply)
                elif not self._procs[r].is_alive():
                    failures[r] = ("died", self._death(r), None)
                    del others[r]
        silent = [r for r, (how, _, _) in failures.items() if how == "died"]
        cause = silent[0] if silent else min(failures, key=lambda r: failures[r][2])
        then = "".join(f"\n(then {what.splitlines()[0]})" for r, (_, what, _) in failures.items() if r != cause)
        self._fail(failures[cause][1] + then, cause)

    @staticmethod
    def _raised(rank: int, value) -> tuple[str, str, float]:
        """("raised", what to report, when) of an error message's value (exception, traceback text, the
        rank's time.monotonic() as it reported)."""
        exc, text, when = value
        return "raised", f"rank {rank} raised {type(exc).__name__}: {exc}\n{text}", when

    def _death(self, rank: int) -> str:
        proc = self._procs[rank]
        proc.join(timeout=1)
        return f"rank {rank} (pid {proc.pid}) died with exit code {proc.exitcode}"

    def _fail(self, message: str, rank: int):
        self._shutdown_all()
        raise RankError(rank, message)

    def _shutdown_all(self) -> None:
        self._closed = True
        self._finalizer()


def _run_out(messages):
    """Drive a stream's _messages generator to its end, dropping its steps (a stream closed before its end)."""
    while True:
        try:
            next(messages)
        except StopIteration as stop:
            return stop.value


def _shutdown(conns, procs, tmp) -> None:
    """Ask the workers to exit, then terminate / kill whatever is left (no orphans)."""
    for conn in conns:
        try:
            conn.send(("close", {}))
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
            pass
    deadline = time.monotonic() + 5
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=2)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=2)
    for conn in conns:
        conn.close()
    tmp.cleanup()


# --------------------------------------------------------------------------------------------------
# The worker: one rank


def _heartbeat(beats, rank: int) -> None:
    while True:
        beats[rank] = time.monotonic()
        time.sleep(HEARTBEAT_INTERVAL_S)


def _worker_main(rank: int, world: int, device: str, backend: str, init: str, load: dict, conn, beats) -> None:
    import threading

    import torch.distributed as dist

    from .rank import RankModel

    threading.Thread(target=_heartbeat, args=(beats, rank), daemon=True, name="cqil-heartbeat").start()
    try:
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                                timeout=timedelta(seconds=600))
        model = RankModel.from_pretrained(load["src"], load["cqil"], device=device, dtype=load["dtype"],
                                          lora=load["lora"], backend=load["backend"],
                                          one_shot=load["one_shot"], bypass_exchange=load["bypass_exchange"],
                                          microbatch_rows=load["microbatch_rows"],
                                          tensor_parallel=load["tensor_parallel"])
        conn.send(("ok", {"args": model.args, "cqil": model.cqil, "dtype": model.dtype,
                          "parameter_bytes": model.parameter_bytes()}))
    except BaseException as e:  # noqa: BLE001 - reported to the driver, which raises it
        _report(conn, e)
        os._exit(1)
    caches: dict[int, Any] = {}
    while True:
        try:
            command, payload = conn.recv()
        except (EOFError, OSError):  # the driver is gone
            os._exit(0)
        if command == "close":
            break
        for cache_id in payload.pop("release", ()):  # handles the driver's process dropped
            caches.pop(cache_id, None)
        try:
            if command == "stream":
                result = _stream(model, payload, rank, conn)
            else:
                result = _run(model, caches, command, payload, rank)
        except _Refused as refusal:
            conn.send(("refused", refusal.error))
            continue
        except BaseException as e:  # noqa: BLE001
            _report(conn, e)
            os._exit(1)
        conn.send(("ok", result))
    conn.close()
    # No destroy_process_group: a rank exiting while a peer is gone can hang in it (launch.end_rank).
    os._exit(0)


def _cache(caches: dict, cache_id: int | None):
    """The rank's cache `cache_id`; a missing one is refused alike on every rank, before any collective."""
    if cache_id is None:
        return None
    if cache_id not in caches:
        raise _Refused(ValueError(f"KV cache {cache_id} was released"))
    return caches[cache_id]


def _run(model, caches: dict, command: str, payload: dict, rank: int):
    if command == "forward":
        cache = _cache(caches, payload["cache"])
        logits = model(payload["input_ids"], payload["attention_mask"], cache=cache,
                       logits_to_keep=payload["logits_to_keep"]).cpu()
        model.reducer.check_health()  # after the copy: every reduction of this call has finished
        return logits if rank == 0 else None
    if command == "generate":
        out = model.generate(payload.pop("input_ids"), payload.pop("max_new_tokens"), **payload)
        return out.cpu() if rank == 0 else None
    if command == "warm_up":
        try:  # refused alike on every rank, before any collective
            warm_up_buckets(payload["lengths"], model.prefill_graphs, model.prefill_graph_limit)
        except ValueError as e:
            raise _Refused(e) from None
        return model.warm_up(payload["batch"], payload["max_seq"], payload["lengths"])
    if command == "new_cache":  # no collective: any failure (out of memory) leaves the ranks consistent
        try:
            caches[payload["id"]] = model.new_cache(payload["batch"], payload["max_seq"])
        except (RuntimeError, ValueError, MemoryError) as e:
            raise _Refused(type(e)(f"cannot make a KV cache of batch {payload['batch']} x {payload['max_seq']} "
                                   f"positions: {str(e).splitlines()[0] if str(e) else type(e).__name__}")) from None
        return None
    if command == "release_cache":
        caches.pop(payload["id"], None)
        return None
    if command == "stats":
        kv_bytes = sum(c.nbytes() for c in caches.values())
        return {"rank": rank, **model.stats(), "kv_caches": len(caches), "kv_cache_bytes": kv_bytes}
    if command == "_test_fault":  # tests: make this rank raise or die mid-call
        if payload.get("rank") == rank:
            if payload["how"] == "raise":
                raise RuntimeError("injected fault")
            os._exit(3)
        model.reducer.all_reduce(torch.zeros(4, device=model.device))  # the others wait on the peer
        return None
    raise ValueError(f"unknown command {command!r}")


def _stream(model, payload: dict, rank: int, conn) -> None:
    """generate's loop as the one-process stream runs it; rank 0 sends each step's tokens to the driver as it
    comes. At the end the ranks' tokens are compared, as RankModel.generate does."""
    fault = payload.pop("_test_fault", None)  # tests: (rank, step, how) makes that rank fail mid-stream
    steps = []
    for step, tokens in enumerate(stream(model, payload.pop("input_ids"), payload.pop("max_new_tokens"), **payload)):
        if fault is not None and fault[:2] == (rank, step):
            if fault[2] == "raise":
                raise RuntimeError("injected fault")
            os._exit(3)
        if rank == 0:
            # plain ints, not a tensor: a CPU tensor goes through shared memory whose file descriptor the driver
            # fetches from this process as it reads the message, which fails once this process has exited (a
            # later step's error): the steps sent before it, and the error itself, would be lost
            conn.send(("step", tokens.tolist()))
        steps.append(tokens)
    model.check_same_tokens(torch.stack(steps, 1))
    return None


def _report(conn, e: BaseException) -> None:
    """Send the driver this rank's error, its traceback, and when it came (time.monotonic(): the same clock in
    every process of the host, so that the driver can tell which rank failed first)."""
    text, when = traceback.format_exc(), time.monotonic()
    try:
        conn.send(("error", (e, text, when)))
    except Exception:  # noqa: BLE001 - an unpicklable exception: send its text
        try:
            conn.send(("error", (RuntimeError(f"{type(e).__name__}: {e}"), text, when)))
        except Exception:  # noqa: BLE001
            pass
