"""CUDA graphs of the fused backend (fused.py): a decode step per token (GraphDecoder, kept with generate's
KV caches across calls by DecodeSlots) and a prompt's forward per length bucket (PrefillGraphs).

A step of the fused backend is about seven launches per stage; enqueueing them costs the host ~40 us each,
far more than the GPU needs for a small model (SmolLM2-135M, 512-token prompt on the H200: 27.6 ms wall,
1.7 ms on the device). A captured graph replays every launch of the step in one call.

Prefill graphs, as serving engines do it:
* A prompt of T tokens is padded on the right to its bucket (`bucket(T)`: a multiple of 16 up to 64, then
  eight buckets per octave, at most 12.5% padding). The padding's keys come after every real token, so
  causal attention never lets a real token see them; its rows are marked invalid, so the cache's
  bookkeeping counts only the T real tokens. The logits are taken at the true length (their rows picked
  on the device from the length copied in before the replay).
* Into an empty cache (a `model(ids)` forward, a prompt into a new cache of the caller's) the prompt runs
  into a KV cache of the graphs' own (the scratch), whose first T positions of every layer are then
  copied into the caller's cache (KVCache.copy_prompt): such a graph serves every later prompt of its
  bucket, whatever cache it goes to. Its bucket must fit the model's max_position_embeddings. The buckets
  of one batch size share one scratch (prompts run one at a time on the stream), as long as a power of two
  that holds the longest of them (at least SCRATCH_MIN positions, at most the model's positions). A scratch
  per bucket, as before, held keys and values for the sum of the buckets' lengths: by the layout's
  arithmetic 26.5 GB for LLaMA-7B's 52 buckets up to 4096, against 2.1 GB for the shared one (at most
  twice the longest bucket's). A bucket longer than the scratch makes a new one of twice the length or
  more, and the buckets captured into the old one are dropped (their next prompts run eagerly, then are
  captured again): at most log2(MAX_BUCKET / SCRATCH_MIN) = 6 times while a batch size keeps its scratch.
* After a cached prefix (a conversation's next turn, generate's second and later chunks of a long prompt)
  the prompt runs straight into the caller's cache, whose position the step reads on the device, so one
  graph serves every prefix length; the padding's slots are given back after the step (the cache's
  position is set to the prefix + T, so the next token overwrites them, and they stay marked invalid).
  Such a graph is bound to that cache (held weakly: it is dropped once the cache is gone), and needs
  room for the whole bucket after the prefix; a prompt without that room runs eagerly. generate's own
  cache, kept from call to call (DecodeSlots, KVCache.long_lived), binds even when empty: its prompts
  need no scratch and no copy (a LLaMA-7B scratch of 4096 positions holds 2 GiB of keys and values).
* The first prompt of a bucket runs the padded step eagerly (it compiles and autotunes the kernels for that
  shape); the second captures it; later ones replay it. At most `limit` graphs are kept per model, the
  least recently used dropped first. Each graph has a memory pool of its own: one pool shared by graphs
  that are freed independently (a decode graph per generate call, evicted buckets) tripped torch 2.11's
  caching allocator (`use_count > 0` asserted when a graph was captured into a pool whose graphs had all
  been freed), on the H200 at 4fe1302.
* A graph holds the packed weights it was captured with: a regrouping, a repack or moved weights drop
  every graph (`PrefillGraphs.current`). The check has two parts: the grouping, the packed weights' identity
  and the other weights' storage, before anything runs; and the scan of every packed parameter's binding,
  which finds one replaced by hand (~60 us of a GPU host's Python for SmolLM2), after a replay is queued,
  while the GPU runs it (a call that runs the step eagerly or captures it scans first: the step packs such
  weights anew as it starts, which must not happen inside a capture). A replay that the scan finds stale
  read the old weights, which the graphs hold; its result is dropped, the cache's bookkeeping put back
  (KVCache.restore) and the prompt run again.
* Captures are thread-local (ops/_common.CAPTURE_MODE): another thread of the process may read the device or pin
  memory while one runs. The package's captures and the eager runs before them on a side stream take turns
  (ops/_common.CAPTURE_LOCK): torch's capture stream and its pool of side streams are shared.
* Threads may launch on streams of their own. The prompt buckets' buffers and scratches are shared by every
  caller: a call from another stream than the last one's first waits for what that one queued (StreamOrder),
  and once two streams have used them they are freed only after the host has waited for that work. A kept
  cache and its decode graph go back only to the stream that used them last (DecodeSlots).
* The model may be a CQILLlama (the fused backend's graphs) or a rank of a multi-GPU run
  (parallel.RankModel, whose step captures its reductions): what a graph needs of it is new_cache,
  packed_weights (and the `packed` it leaves), graph_signature, cqil, args and device, and the step function.
"""

from __future__ import annotations

import collections
import functools
import threading
import warnings
import weakref

import torch

from .generation import check_inputs_late, generation_slot
from .ops._common import before_capture, cuda_graph

# The longest prompt a graph takes in one forward (generate's prefill_chunk default): longer prompts run
# eagerly, where the device time of each part dwarfs the host's launch time.
MAX_BUCKET = 4096

# Prompt buckets kept per model (each holds a memory pool of its own): 64, more than the 52 buckets up to
# MAX_BUCKET, so one batch size's prompts of any length keep their graphs. With 8, a mix of prompt lengths
# thrashed: SmolLM2 on the H200 at 02f60b6 (benchmarks/prompt_mix.py, 200 prompts over 42 buckets) took
# 24.9 ms to the first token at the median against 1.9 ms with 64, every evicted bucket's next prompts
# running eagerly and being captured again; the 40 graphs more held 464 MiB more
# (benchmarks/results/prompt_mix_smollm2_h200_02f60b6.json).
MAX_GRAPHS = 64

# The shortest scratch (the buckets' shared KV cache for prompts into an empty cache): the four buckets up to
# 64 tokens share it from the first prompt on, with no scratch made anew as they come.
SCRATCH_MIN = 64

# generate's KV caches kept per model with their decode graphs (DecodeSlots): one, so that what a call keeps
# is never more than it used, and a call that needs a new cache frees the kept one first.
MAX_DECODE_SLOTS = 1


def current_stream(device: torch.device):
    """The stream a call on `device` queues its work on (None off CUDA)."""
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


class StreamOrder:
    """Shared device buffers (a model's prompt buckets and the scratch caches they share) used from several
    streams in the order the calls came. follow(), under the host lock that orders the calls: a call from another
    stream than the last one's first makes its stream wait for everything queued on that one (the streams form
    one chain), so that threads launching on streams of their own use the buffers in turn, as on one stream.
    release(), before any of the buffers is freed: once a second stream has come, the host waits for the last
    stream (and by the chain, all before it). The caching allocator orders a freed block's reuse only on the
    stream that allocated it; work of another stream still reading it would race the block's next owner."""

    def __init__(self):
        self.stream = None
        self.shared = False  # a second stream has used the buffers

    def follow(self, device: torch.device) -> None:
        stream = current_stream(device)
        if self.stream is not None and stream != self.stream:
            stream.wait_stream(self.stream)
            self.shared = True
        self.stream = stream

    def release(self) -> None:
        if self.shared:
            self.stream.synchronize()


def check_limit(limit) -> int:
    """A number of graphs kept: an int >= 1, else ValueError."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be an int >= 1, got {limit!r}")
    return limit


def bucket(T: int) -> int:
    """The length a prompt of T tokens is padded to: a multiple of 16 up to 64, then of 2**(k-3) for T in
    [2**k, 2**(k+1)): eight buckets per octave, so the padding is under 12.5% of T."""
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"a prompt length must be an int >= 1, got {T!r}")
    unit = 16 if T <= 64 else 1 << (T.bit_length() - 4)
    return -(-T // unit) * unit


class _CapturedLazily:
    """What a decode step and a prompt bucket share: their step runs eagerly on the first call (on a side
    stream: it compiles and autotunes the kernels for the shape), is captured in a CUDA graph on the second
    and replayed on every later one, whose result is the graph's output buffer (read it before the next
    replay). fn must read the same buffers every time: a replay runs what the capture recorded.

    A graph is kept only once its capture has completed: a capture that raised is never replayed. One that
    ran out of memory (a graph's pool cannot take the blocks torch's allocator holds for eager work) warns,
    runs the step eagerly and leaves this step eager from then on (a bucket evicted and made again tries
    anew); any other error propagates."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Back to before the first call: the graph (and the memory it holds) dropped, the next call eager."""
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None
        self.calls = 0
        self.eager_only = False

    def replay_or_run(self, fn, capture: bool = True) -> torch.Tensor:
        """fn() as above; capture=False runs it eagerly every time (the CPU, under the interpreter)."""
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
            return self.out
        if not capture or self.eager_only:
            return fn()
        if self.calls == 1:
            with before_capture():  # if fn raises part-way, KVCache.restore runs after what it launched
                out = fn()
            return out
        graph = torch.cuda.CUDAGraph()
        try:
            with cuda_graph(graph):
                out = fn()
        except torch.cuda.OutOfMemoryError as e:
            del graph
            self.eager_only = True
            warnings.warn(f"no memory to capture a CUDA graph of this step ({str(e).splitlines()[0]}); it runs "
                          "eagerly (lower model.accelerator.prefill_graph_limit to keep fewer prompt graphs)",
                          RuntimeWarning, stacklevel=3)
            return fn()
        self.graph, self.out = graph, out
        graph.replay()
        return out


class GraphDecoder(_CapturedLazily):
    """One decode step (a token per row) as a captured CUDA graph, bound to one KV cache.

    The first call runs eagerly, the second captures the step and replays it; every later call only copies
    the new tokens in and replays (_CapturedLazily). The returned logits [B, vocab] live in the graph's
    output buffer: use them before the next call. step_fn(tokens, valid, cache) is the function captured
    (the fused backend's step for this model; a rank of a multi-GPU run passes its own, reductions
    included). check_tokens: refuse ids outside the vocabulary, with a read of the device every step that the
    host takes once the step is queued (generation.InputCheck; the tokens are clamped as they are copied in, so
    the captured embedding lookup never indexes out of bounds; on ValueError the cache is restored); generate,
    whose tokens are the model's own argmax or draws, passes False.
    follow_packing: where the model's weights were packed anew since the step was made (a parameter replaced
    by hand, found by the scan of a prompt's forward) and its grouping is the same, drop the graph and make
    the step again from the new packing (its next call eager, the one after captured), instead of refusing
    to run: generate's kept steps (DecodeSlots), whose caches stay valid, since the layout depends on the
    grouping only.
    """

    def __init__(self, model, cache, step_fn, check_tokens: bool = True, follow_packing: bool = False):
        if cache.stages != model.stages:
            raise ValueError("this KV cache was made for another CQIL grouping")
        super().__init__()
        self.model, self.cache, self.step_fn = model, cache, step_fn
        self.tokens = torch.zeros(cache.batch, 1, dtype=torch.long, device=model.device)
        # what the step is made for, checked by identity at every call (~1 us; the rest of graph_signature
        # where generate takes a kept step, DecodeSlots.take; the packed weights' bindings by generate's prompt)
        self.cqil, self.packed = model.cqil, model.packed_weights()
        self.check_tokens, self.follow_packing = check_tokens, follow_packing

    def __call__(self, next_tokens: torch.Tensor) -> torch.Tensor:
        cache, model = self.cache, self.model
        if model.cqil is not self.cqil or model.packed is not self.packed:
            if not (self.follow_packing and model.cqil is self.cqil):
                raise ValueError("the model's grouping or packed weights changed since this decode step was made: "
                                 "make a new cache and step (model.new_cache, model.decoder)")
            self.reset()  # the old packing's graph (it holds those weights) goes
            self.packed = model.packed_weights()
        if cache.length + 1 > cache.max_seq:
            raise ValueError(f"{cache.length + 1} positions exceed the KV cache ({cache.max_seq})")
        if not isinstance(next_tokens, torch.Tensor) or next_tokens.numel() != cache.batch:
            raise ValueError(f"next_tokens must be a tensor of {cache.batch} token ids (one per row of the cache), "
                             f"got {next_tokens if not isinstance(next_tokens, torch.Tensor) else next_tokens.shape}")
        check = None
        if self.check_tokens:  # tokens on the GPU: read once the step is queued, clamped as they are copied in
            tokens, _, check = check_inputs_late(next_tokens.reshape(cache.batch, 1), model.args.vocab_size,
                                                 device=model.device)
            torch.clamp(tokens, 0, model.args.vocab_size - 1, out=self.tokens)
        else:
            self.tokens.copy_(next_tokens.view(cache.batch, 1))
        try:
            logits = self.replay_or_run(lambda: self.step_fn(self.tokens, None, cache))
            if check is not None:
                check.wait()
        except BaseException:  # as the model's forward: the cache as it was (KVCache.restore)
            cache.restore()
            raise
        cache.length += 1
        return logits[:, -1]


class _Bucket(_CapturedLazily):
    """A [batch, length] padded prompt forward: its input buffers, where it runs (the scratch its batch size's
    buckets share, or the cache it is bound to, held weakly) and once captured its graph. keep: the logits of
    the last `keep` real positions of each row (0: of every position). scratch: where cache is None, the
    cache of at least `length` positions it runs in (PrefillGraphs' shared one)."""

    def __init__(self, model, batch: int, length: int, keep: int, cache=None, scratch=None):
        super().__init__()
        device = model.device
        self.keep = keep
        self.ids = torch.zeros(batch, length, dtype=torch.long, device=device)
        self.top_id = model.args.vocab_size - 1  # load clamps the ids to the vocabulary
        # the prompt's mask in [:T]; True everywhere while no masked prompt has come since it was last filled
        # (mask_set), so that an unmasked prompt, the usual one, needs no fill before its replay
        self.mask = torch.ones(batch, length, dtype=torch.bool, device=device)
        self.mask_set = False
        self.count = torch.zeros(1, dtype=torch.int32, device=device)  # T, the true length
        self.counted = 0  # the T `count` holds: written only when a prompt of another length comes (a launch)
        self.columns = torch.arange(length, device=device)
        # row b's last `keep` real positions are rows b * length + T - keep + j of the step's B * length
        self.base = (torch.arange(batch, device=device)[:, None] * length
                     + torch.arange(keep, device=device)[None] - keep).view(-1)
        # the caller's cache (a prompt after a prefix), or the scratch (a rank's: the heads of its shards), whose
        # first T positions copy_prompt hands over
        self.target = weakref.ref(cache) if cache is not None else None
        self.scratch = scratch if cache is None else None

    def load(self, input_ids: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Copy a prompt [B, T] (T <= length) and its mask in; the padding stays invalid. A prompt of the last
        one's length (a chunked prompt's chunks, requests of one shape) is one launch. The ids are clamped to
        the vocabulary as they are copied (the same one launch): a prompt whose input check is read after its
        replay is queued (generation.InputCheck) reads no embedding row outside the table, whatever it holds."""
        T = input_ids.shape[1]
        torch.clamp(input_ids, 0, self.top_id, out=self.ids[:, :T])
        if valid is not None:
            self.mask[:, :T].copy_(valid)
            self.mask_set = True
        elif self.mask_set:
            self.mask.fill_(True)
            self.mask_set = False
        if T != self.counted:
            self.count.fill_(T)
            self.counted = T

    def forward(self, step_fn) -> torch.Tensor:
        """The padded step into the scratch or the caller's cache (reads the length on the device only:
        capturable)."""
        if self.target is None:
            cache = self.scratch
            cache.n_tokens.zero_()
            cache.position.zero_()
        else:
            cache = self.target()
        valid = self.mask & (self.columns < self.count)
        logits = step_fn(self.ids, valid, cache, self.base + self.count if self.keep else None)
        if self.target is not None:  # the padding's slots are free again: the next token goes at start + T
            torch.add(cache.start, self.count, out=cache.position)
        return logits


class PrefillGraphs:
    """A model's prompt forwards by length bucket (see the module docstring). step_fn(model, ids, valid,
    cache, rows) is the step captured: ids [B, Tb] padded on the right (valid False in the padding) into
    `cache`, returning the logits of the step's rows `rows` (device indices into its B * Tb rows, [B * k])
    as [B, k, V], or of every row when rows is None (the fused backend's: fused.padded_step). capture:
    replay CUDA graphs (CUDA only); without, the same padded step runs eagerly every time (the CPU tests of
    its logic)."""

    def __init__(self, model, step_fn, capture: bool = True, limit: int = MAX_GRAPHS):
        self.model, self.step_fn = weakref.ref(model), step_fn
        self.capture, self.limit = capture, check_limit(limit)
        # (batch, bucket, keep, id of the cache it is bound to (binds), else None: the scratch path) -> its bucket
        self.buckets: collections.OrderedDict[tuple, _Bucket] = collections.OrderedDict()
        self.scratches: dict[int, object] = {}  # batch -> the scratch its buckets share (KVCache)
        self.signature = None  # what the graphs were captured with (current())
        self.packed = None  # the packed weights they read, held so that their id stays theirs
        # one call at a time: the buckets' input buffers and the scratch caches are shared by every caller, and
        # a prompt loaded by a second thread before the first one's step has read it would run in its place
        self.lock = threading.RLock()
        self.order = StreamOrder()  # and on the device, in the order of the calls, whatever stream each came on

    @staticmethod
    def binds(cache, T: int) -> bool:
        """Whether a prompt of T tokens runs straight in `cache` through a bucket bound to it: after a cached
        prefix, or into an empty cache kept for later calls (KVCache.long_lived), where the cache has room for
        the whole bucket."""
        return (cache is not None and (cache.length > 0 or cache.long_lived)
                and cache.length + bucket(T) <= cache.max_seq)

    @staticmethod
    def serves(model, input_ids: torch.Tensor, cache) -> bool:
        """Whether a forward of input_ids into `cache` (None: a plain forward) can run here: a prompt of at
        most MAX_BUCKET tokens, bound to the cache (binds), or into an empty cache through a scratch bucket
        the model's positions hold."""
        T = input_ids.shape[1]
        if T > MAX_BUCKET:
            return False
        if PrefillGraphs.binds(cache, T):
            return True
        return (cache is None or cache.length == 0) and bucket(T) <= model.args.max_position_embeddings

    def resize(self, limit: int) -> None:
        """Keep at most `limit` buckets from now on (the least recently used dropped at once), once a prompt in
        flight has returned."""
        limit = check_limit(limit)
        with self.lock:
            self.limit = limit
            self._keep_at_most(self.limit)
            self._drop_idle_scratches()

    def captured(self) -> int:
        """The number of graphs held."""
        with self.lock:
            return sum(b.graph is not None for b in self.buckets.values())

    def clear(self) -> None:
        """Drop every graph and scratch, once a prompt in flight has returned (it would keep its bucket)."""
        with self.lock:
            self._drop(list(self.buckets), list(self.scratches))

    def _drop(self, keys=(), batches=()) -> None:
        """Drop these buckets and the scratches of these batch sizes. Their memory may go to the next
        allocation of any stream, so where streams have shared them the host first waits for the last one's
        work (StreamOrder.release), once. Every bucket and scratch dropped goes through here."""
        keys = list(keys)
        batches = [batch for batch in batches if batch in self.scratches]
        if keys or batches:
            self.order.release()
        for key in keys:
            del self.buckets[key]
        for batch in batches:
            del self.scratches[batch]

    def _keep_at_most(self, n: int) -> None:
        """Drop the least recently used buckets until at most n are left."""
        self._drop(list(self.buckets)[:max(0, len(self.buckets) - n)])

    def _scratch_for(self, model, batch: int, length: int):
        """The scratch of `batch` rows for a bucket of `length` positions: the batch size's shared one where it
        is long enough; else a new one of the next power of two (at least SCRATCH_MIN, at most the model's
        positions), the buckets captured into the old one dropped first (they wrote it: their memory goes
        with it)."""
        scratch = self.scratches.get(batch)
        if scratch is not None and scratch.max_seq >= length:
            return scratch
        # the old scratch and the buckets captured into it: its memory is free for the new one
        self._drop([key for key in self.buckets if key[0] == batch and key[3] is None], [batch])
        positions = min(max(SCRATCH_MIN, 1 << (length - 1).bit_length()), model.args.max_position_embeddings)
        self.scratches[batch] = scratch = model.new_cache(batch, max(positions, length))
        return scratch

    def _drop_idle_scratches(self) -> None:
        """Drop the scratch of a batch size that no bucket kept uses."""
        used = {key[0] for key in self.buckets if key[3] is None}
        self._drop(batches=[batch for batch in self.scratches if batch not in used])

    def current(self, model) -> None:
        """Drop the graphs when what they were captured with has changed (model.graph_signature())."""
        signature = model.graph_signature()
        if signature != self.signature:
            self.clear()
            self.signature = signature
            self.packed = model.packed_weights()  # its id is in the signature: held, so it stays its own

    def __call__(self, model, input_ids: torch.Tensor, valid: torch.Tensor | None, cache,
                 logits_to_keep: int = 0, check=None) -> torch.Tensor:
        """model(input_ids, valid, cache, logits_to_keep) through the bucket's graph: the logits [B, k, V]
        of the last k = logits_to_keep positions (0: all T), a tensor of the caller's. check: the inputs'
        value checks still to be read (generation.InputCheck), waited for once the step is queued and before
        anything reaches the caller's cache from a scratch; where it raises, a cache the step ran in is the
        caller's to restore (the model's forward does)."""
        with self.lock:
            return self._call(model, input_ids, valid, cache, logits_to_keep, check)

    def _call(self, model, input_ids: torch.Tensor, valid: torch.Tensor | None, cache,
              logits_to_keep: int, check=None) -> torch.Tensor:
        if self.model() is not model:
            raise ValueError("these prefill graphs belong to another model")
        if not self.serves(model, input_ids, cache):
            raise ValueError(f"a prefill graph takes a prompt of at most {MAX_BUCKET} tokens, into an empty cache "
                             "(its bucket within max_position_embeddings), or after a prefix or into a cache kept "
                             "for later calls with room in the cache for its bucket")
        self.order.follow(input_ids.device)
        B, T = input_ids.shape
        keep = 0 if logits_to_keep >= T else logits_to_keep
        bound = self.binds(cache, T)
        key = (B, bucket(T), keep, id(cache) if bound else None)
        # The bindings' scan is left for after the replay is queued when this call replays a graph and the rest
        # of the signature holds: it can only find parameters replaced by hand, whose old storage the graphs
        # hold (self.packed). A step that runs eagerly or is captured packs such weights anew as it starts, and
        # must not inside a capture (the packed weights would live in the graph's memory pool): checked first.
        entry = self.buckets.get(key)
        if entry is not None and entry.target is not None and entry.target() is not cache:
            self._drop([key])  # bound to a cache that is gone, whose id this one has now
            entry = None
        deferred = (entry is not None and entry.graph is not None
                    and model.graph_signature(scan=False) == self.signature)
        if not deferred:
            self.current(model)
        entry = self.buckets.pop(key, None)
        if entry is None:
            self._drop_unbound()  # before a capture: their memory can be reused
            self._keep_at_most(self.limit - 1)
            # normal tensors even when made under generate's inference_mode: a later forward outside it
            # updates them in place
            with torch.inference_mode(False):
                scratch = None if bound else self._scratch_for(model, B, key[1])
                entry = _Bucket(model, B, key[1], keep, cache if bound else None, scratch)
            self.buckets[key] = entry
            self._drop_idle_scratches()  # a batch size whose last scratch bucket went to make room
        else:
            self.buckets[key] = entry
        entry.load(input_ids, valid)
        logits = entry.replay_or_run(lambda: entry.forward(functools.partial(self.step_fn, model)), self.capture)
        if check is not None:  # the ids were clamped as they were loaded: the step read no row outside the table
            check.wait()
        if deferred and model.graph_signature() != self.signature:
            # a parameter was replaced by hand since the capture: the replay read the old weights (held, so valid
            # memory); its result is dropped, the cache's bookkeeping put back, and the prompt runs again
            if bound:
                cache.restore()
            self.current(model)
            return self._call(model, input_ids, valid, cache, logits_to_keep)
        if cache is not None and not bound:
            cache.copy_prompt(entry.scratch, T)
        logits = logits[:, :T].clone() if keep == 0 else logits.clone()
        self._drop_unbound()  # once the prompt is queued: this host time is not the prompt's
        return logits

    def _drop_unbound(self) -> None:
        """Drop the buckets bound to a cache that is gone."""
        self._drop([key for key, entry in self.buckets.items()
                    if entry.target is not None and entry.target() is None])


def warm_up_buckets(lengths, prompts: bool, limit: int) -> dict[int, int]:
    """The prompt buckets a warm-up captures for these prompt lengths, bucket -> the longest of its lengths
    (it stands for the bucket); ValueError for a length one forward does not take or more buckets than
    `limit` (the buckets kept) when prompts are captured."""
    longest = {}
    for T in sorted(lengths):
        if T > MAX_BUCKET:
            raise ValueError(f"a prompt length of at most {MAX_BUCKET} (one forward of generate; longer prompts go "
                             f"in parts of prefill_chunk: warm up the parts' lengths), got {T}")
        longest[bucket(T)] = T
    if prompts and len(longest) > limit:
        raise ValueError(f"these prompt lengths fall in {len(longest)} buckets, more than the {limit} kept "
                         "(prefill_graph_limit): later ones would evict earlier ones")
    return longest


def warm_up(model, batch: int, max_seq: int, longest: dict[int, int], prompts: bool) -> list[int]:
    """Capture what generate runs for `batch` rows and max_seq positions (CQILTransformer.warm_up) on a model
    whose generate keeps its cache and decode graph (DecodeSlots) and replays prompt buckets: the kept cache
    made first with its decode step (run twice: eager, then captured; a decode step into an empty cache is a
    one-token prompt, and the next take clears it), then per bucket of `longest` (warm_up_buckets)
    generate(prompt, 1) twice (the bucket's eager run, then its capture). Every rank of a multi-GPU run makes
    the same calls (their collectives included). Returns the buckets captured."""
    model.packed_weights()  # the bindings' scan, which DecodeSlots.take leaves to a prompt: the steps come first
    with generation_slot(model, batch, max_seq) as (_, decode), torch.inference_mode():  # let go: the prompts take it
        for _ in range(2):
            decode(torch.zeros(batch, dtype=torch.long, device=model.device))
    if prompts:
        for T in longest.values():
            ids = torch.zeros(batch, T, dtype=torch.long, device=model.device)
            for _ in range(2):
                model.generate(ids, 1)
    torch.cuda.synchronize(model.device)
    return sorted(longest) if prompts else []


class DecodeSlots:
    """generate's KV caches, each with its decode step (a GraphDecoder bound to it), kept for later calls.

    A generate call takes the smallest slot of its batch size that holds its length, cleared
    (KVCache.clear), whose decode graph an earlier call captured, not busy (a stream still running in it,
    KVCache.busy), and last taken on the caller's stream (KVCache.stream); only when none fits is a cache made, of
    bucket(length) positions (the prompt buckets' rounding: at most 12.5% more than asked; a decode step's
    time does not depend on the cache's size, its attention reads the filled positions only). Before, every
    call made a cache and a graph of its own, so its first decode step ran eagerly and its second was
    captured: two steps' worth of Python launches per call. The prompt buckets bound to a slot's cache
    (PrefillGraphs, a long prompt's later parts) are kept with it. At most `limit` slots, the least
    recently used dropped first; a changed model (graph_signature) drops them all.
    decoder_of(model, cache) makes the decode step of a new slot. shrink: where the rounded-up cache does not
    fit the memory, drop the kept ones and make one of the exact length (as generate did before it kept
    any); the ranks of a multi-GPU run pass False, since a cache's size decides whether a prompt after a
    prefix replays a graph, and every rank must take the same path.
    """

    def __init__(self, decoder_of, limit: int = MAX_DECODE_SLOTS, shrink: bool = True):
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be an int >= 1, got {limit!r}")
        self.decoder_of, self.limit, self.shrink = decoder_of, limit, shrink
        self.slots: list[tuple] = []  # (cache, decode step), least recently used first
        self.signature = None
        self.lock = threading.Lock()  # take() from several threads: a slot is handed to one of them only

    def take(self, model, batch: int, length: int) -> tuple:
        """(an empty cache of `batch` rows and at least `length` positions, its decode step), the cache marked
        busy (KVCache.busy: the caller clears it when its generation ends) before another thread can take it.
        The model is checked without the scan of the packed weights' bindings (graph_signature(scan=False)):
        that scan came before generate's prompt could start. The prompt's forward, which comes next, scans
        them (PrefillGraphs, or the eager step's packed_weights()) and packs anew where a parameter was
        replaced by hand; a kept decode step then follows the new packing (GraphDecoder.follow_packing),
        and the next take, seeing the new packing, drops the slots."""
        with self.lock:
            slot = self._take(model, batch, length)
            slot[0].busy = True
            return slot

    def _take(self, model, batch: int, length: int) -> tuple:
        signature = model.graph_signature(scan=model.packed is None)
        if signature != self.signature:
            self.slots.clear()
            self.signature = signature
        # a kept cache goes back only to the stream that used it last: no wait for another stream's work in it,
        # and its memory is only ever freed after work of the stream that allocated it
        stream = current_stream(model.device)
        fits = [slot for slot in self.slots if slot[0].batch == batch and slot[0].max_seq >= length
                and not slot[0].busy and slot[0].stream == stream]
        if fits:
            slot = min(fits, key=lambda fit: fit[0].max_seq)
            self.slots.remove(slot)
            slot[0].clear()
        else:
            while len(self.slots) >= self.limit:
                self.slots.pop(0)  # before the new cache is allocated: its memory can be reused
            max_seq = max(length, min(bucket(length), model.args.max_position_embeddings))
            # normal tensors even under generate's inference_mode (as the prompt buckets')
            with torch.inference_mode(False):
                try:
                    cache = model.new_cache(batch, max_seq)
                except MemoryError:  # what a call without kept caches would have had: none kept, no rounding
                    if not self.shrink:
                        raise
                    self.slots.clear()
                    cache = model.new_cache(batch, length)
                cache.long_lived = True  # the prompts' graphs bind to it (PrefillGraphs)
                cache.stream = stream
                decode = self.decoder_of(model, cache)
                if isinstance(decode, GraphDecoder):
                    decode.follow_packing = True  # take() leaves the bindings' scan to the prompt (above)
                slot = (cache, decode)
        self.slots.append(slot)
        return slot

    def clear(self) -> None:
        """Drop every slot (their caches and graphs), once a take in flight has returned (it would keep its slot)."""
        with self.lock:
            self.slots.clear()

    def cache_bytes(self) -> int:
        """The device memory of the kept caches' keys and values."""
        with self.lock:
            return sum(cache.nbytes() for cache, _ in self.slots)
