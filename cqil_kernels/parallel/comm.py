"""Communication of a rank: the group reduction (sum over ranks) and the bypass exchange.

GroupReducer.all_reduce sums a tensor over all ranks, in place, on the current stream (decode: the
result is needed at once). all_reduce_async runs it on a dedicated communication stream ordered by CUDA
events, so work that does not depend on the result (the other micro-batch of a prefill: rank.py) overlaps
with it. Each call picks its path:
  * "one_shot": the C++/CUDA kernel of csrc/one_shot.cu — every rank writes its tensor into its own
    peer-accessible buffer, and reads and sums all ranks' buffers in rank order (so every rank gets the
    same bits); one launch, capturable in a CUDA graph; for messages up to default_one_shot_bytes(world)
    (a decode step's hidden state; on 2 GPUs also a prefill's);
  * "copy_engine": all_reduce_async only (a prefill's micro-batches, rank.py) — csrc/copy_engine.cu
    moves the message to the peers by DMA and waits for theirs with stream memory operations, so no
    SM is held while the reduction runs beside the other micro-batch's GEMMs (the one-shot kernel and
    NCCL both keep SMs busy, waiting included); a small kernel sums the ranks' messages in rank order
    (the one-shot's bits). Its waits have no timeout: a dead peer is handled by the process supervision
    (driver.py, torchrun);
  * "nccl" / "gloo": torch.distributed.all_reduce, for everything else.
`GroupReducer.policy(tensor)` says which path a tensor takes and why (`PeerPathPolicy`).
all_reduce_sum takes a decode stage's split-K partial products and residual (fp32) instead of its output:
the one-shot kernel forms the rank's term in its first step, which saves the launch that sums them.
On the current stream the one-shot kernel is launched with programmatic dependent launch where our
Triton kernels are (ops/_pdl.py; CQIL_PDL=0 turns both off).

The bypass (d >= 1): rank j of a group needs a_{j-1..j-d} from the ranks before it before its MLP. Two
ways to move them, with the same result bit for bit:
  * `exchange_bypass` (RankModel's bypass_exchange="p2p"): rank j sends its own a_j to ranks j+1..j+d;
    the sends are asynchronous and waited for after the sender's MLP, so the transfer overlaps with it.
    NCCL point-to-point calls are not captured in our CUDA graphs, so such decode steps run eagerly;
  * `gather_bypass` ("all_reduce"): one all-reduce of a zeroed buffer in which each rank has written its
    a_j into its own row. Adding zeros is exact, so every rank receives every a_j unchanged: an
    all-gather through GroupReducer, which for a decode step's few KB is one capturable one-shot launch,
    so the decode step with a bypass is one CUDA graph replay too. Every rank of the reducer's group
    joins it, also ranks idle for the group.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import _ext

ONE_SHOT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def default_one_shot_bytes(world: int) -> int:
    """The largest message the one-shot kernel takes by default among `world` ranks; NCCL above it.

    Every rank reads every other rank's whole message, (world - 1) x its bytes, where NCCL's ring moves
    about 2 (world - 1) / world x, so the one-shot's lead shrinks with size and with the ranks. Measured
    inside CUDA graphs, bf16 (benchmarks/results/reductions.json, benchmarks/reduce_sizes.py): on 2 H200s the
    one-shot beats NCCL at every size from 8 KB to 8 MB (4 MB, a 512-token LLaMA-7B prefill's hidden
    state: 22 us vs 35; 8 MB: 39 vs 48), hence 8 MB for 2 ranks. On 4 H200s it
    wins up to 1 MB (19 us vs 21), ties at 2 MB and loses at 4 MB (52 vs 43), hence 1 MB for 3 and 4
    ranks. More ranks keep 512 KB (not measured with this kernel).
    """
    return 8 << 20 if world <= 2 else 1 << 20 if world <= 4 else 512 << 10


COPY_ENGINE_BYTES = 8 << 20  # the copy-engine path's largest message (a 1024-row micro-batch of LLaMA-7B)


@dataclass(frozen=True)
class PeerPathPolicy:
    """When a path through peer memory (the one-shot kernel, the copy engines) is used: `enabled` (it
    could be set up on every rank; else `reason`), and per call a tensor of at most max_bytes, a
    supported dtype, 16-byte aligned and contiguous."""

    name: str
    enabled: bool
    reason: str
    max_bytes: int

    def check(self, t: torch.Tensor) -> str | None:
        """None when `t` can take the one-shot path, else why not."""
        if not self.enabled:
            return self.reason
        nbytes = t.numel() * t.element_size()
        if nbytes > self.max_bytes:
            return f"{nbytes} bytes > {self.name} limit {self.max_bytes}"
        if t.dtype not in ONE_SHOT_DTYPES:
            return f"dtype {t.dtype} ({self.name}: float32/float16/bfloat16)"
        if not t.is_contiguous():
            return "not contiguous"
        if t.data_ptr() % 16 or nbytes % 16:
            return "not 16-byte aligned"
        return None


class GroupReducer:
    """Sum over the ranks of `group` (default: the world), in place, on `device`.

    one_shot: None = use the one-shot kernel where it can run (CUDA, the extension built with CUDA,
    peer access between every pair of devices), True = require it (RuntimeError saying why not), False
    = never. Every rank must construct it (collectively) with the same arguments.
    max_bytes: the largest message the one-shot kernel takes (None: default_one_shot_bytes(world));
    each rank's peer buffer holds twice that.
    timeout_s: how long a one-shot call waits for a peer before giving up (check_health() then raises).
    Generous, because a rank can legitimately lag by a kernel compilation or autotuning run.
    copy_engine: the same choice for the copy-engine path of all_reduce_async (None: where it can run).
    """

    def __init__(self, device: torch.device, group=None, one_shot: bool | None = None,
                 max_bytes: int | None = None, timeout_s: float = 120.0, copy_engine: bool | None = None):
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)
                                      or max_bytes < 16 or max_bytes % 16):
            raise ValueError(f"max_bytes must be a positive multiple of 16, got {max_bytes!r}")
        self.device, self.group = torch.device(device), group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        if max_bytes is None:
            max_bytes = default_one_shot_bytes(self.world)
        self.backend = dist.get_backend(group)
        self.calls = {"one_shot": 0, "copy_engine": 0, self.backend: 0}
        self.last_reason: str | None = None
        # Benchmarks only (P6's "how much of the reduction is hidden"): skip the communication, so
        # results are WRONG; never set in inference.
        self.skip_for_benchmark = False
        self.comm_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._one_shot, reason = self._setup_peer_path(
            "one_shot", one_shot, lambda: _ext.one_shot_all_reduce(self.device.index, self.rank, self.world,
                                                                   max_bytes, timeout_s))
        self.one_shot_policy = PeerPathPolicy("one-shot", reason is None, reason or "", max_bytes)
        self._copy_engine, reason = self._setup_peer_path(
            "copy_engine", copy_engine, lambda: _ext.copy_engine_all_reduce(self.device.index, self.rank, self.world,
                                                                            COPY_ENGINE_BYTES))
        self.copy_engine_policy = PeerPathPolicy("copy-engine", reason is None, reason or "", COPY_ENGINE_BYTES)

    def _setup_peer_path(self, name: str, wanted: bool | None, make):
        """(the extension object, None) when make() and opening the other ranks' buffers succeeded on
        every rank, else (None, why not); wanted=True turns a failure into a RuntimeError. The decision
        is agreed by all ranks (an all-reduce of the local verdicts), so every rank takes the same path
        for every call."""
        if wanted is False:
            return None, f"disabled ({name}=False)"
        reason, peer = None, None
        if self.device.type != "cuda":
            reason = f"tensors on {self.device.type}, the {name} path needs CUDA"
        elif not _ext.cuda_available():
            reason = _ext.cuda_unavailable_reason()
        elif self.world > 8:
            reason = f"world size {self.world} > 8"
        mine = (reason, b"", "", socket.gethostname())
        if reason is None:
            try:
                peer = make()
                mine = (None, peer.ipc_handle(), peer.pci_bus_id(), mine[3])
            except RuntimeError as e:
                mine, peer = (str(e), b"", "", mine[3]), None
        everyone: list = [None] * self.world
        dist.all_gather_object(everyone, mine, group=self.group)
        reasons = [f"rank {r}: {why}" for r, (why, *_) in enumerate(everyone) if why is not None]
        if not reasons and len({host for *_, host in everyone}) > 1:
            reasons.append("the ranks are on different hosts (peer memory is per host)")
        if not reasons:
            try:
                peer.open_peers([e[1] for e in everyone], [e[2] for e in everyone])
            except RuntimeError as e:
                reasons.append(f"rank {self.rank}: {e}")
        ok = torch.tensor([0 if reasons else 1], device=self.device if self.backend == "nccl" else "cpu")
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.group)
        if int(ok) == 1:
            dist.barrier(group=self.group)  # every rank's flags are zeroed before anyone signals
            return peer, None
        reason = "; ".join(reasons) or "another rank could not open the peer buffers"
        if wanted is True:
            raise RuntimeError(f"{name}=True but the {name} all-reduce cannot run: {reason}")
        return None, reason

    def policy(self, t: torch.Tensor, overlapped: bool = False) -> tuple[str, str | None]:
        """(path, reason): the path `t` would take — through all_reduce_async when `overlapped` — and,
        for the fallback, why the faster paths cannot."""
        whys = []
        if overlapped:
            why = self.copy_engine_policy.check(t)
            if why is None:
                return "copy_engine", None
            whys.append(f"copy-engine: {why}")
        why = self.one_shot_policy.check(t)
        if why is None:
            return "one_shot", None
        whys.append(why if not overlapped else f"one-shot: {why}")
        return self.backend, "; ".join(whys)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """t += the other ranks' t (every rank gets the same sum), on the current stream. Returns t.
        For a result needed at once (decode): no stream fork/join, which costs ~5 us in a CUDA graph."""
        return self._reduce(t, self._path(t))

    def _reduce(self, t: torch.Tensor, path: str | None) -> torch.Tensor:
        """all_reduce's work once the path is chosen (and counted)."""
        if path is None:
            return t
        if path == "one_shot":
            self._launch_one_shot(t, torch.cuda.current_stream(self.device), _pdl(self.device))
        else:
            dist.all_reduce(t, group=self.group)
        return t

    def all_reduce_sum(self, parts: torch.Tensor, residual: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out = the sum over ranks of each rank's residual + parts[0] + parts[1] + ... (fp32, added in that
        order, rounded once to out's dtype: what ops.group_down_sum makes of a split-K GEMM's partial
        products), on the current stream. Returns out.

        parts: [n, *out.shape] fp32 (1 <= n <= 8); residual: out's shape, fp32. On the one-shot path
        each rank's term is formed inside the reduction kernel, which saves a decode stage the launch
        that would sum the partial products first; on the others it is formed by torch (the same bits)
        and then reduced."""
        if parts.dtype != torch.float32 or residual.dtype != torch.float32:
            raise TypeError(f"parts and residual must be float32, got {parts.dtype} and {residual.dtype}")
        if tuple(parts.shape[1:]) != tuple(out.shape) or tuple(residual.shape) != tuple(out.shape):
            raise ValueError(f"parts {tuple(parts.shape)} and residual {tuple(residual.shape)} must be "
                             f"[n, *{tuple(out.shape)}] and {tuple(out.shape)}")
        if not 1 <= parts.shape[0] <= 8:
            raise ValueError(f"1 to 8 partial products, got {parts.shape[0]}")
        if parts.device != out.device or residual.device != out.device:
            raise ValueError(f"parts ({parts.device}), residual ({residual.device}) and out ({out.device}) "
                             f"must be on one device")
        path = self._path(out)
        fused = (path == "one_shot" and parts.is_contiguous() and residual.is_contiguous()
                 and parts.data_ptr() % 16 == 0 and residual.data_ptr() % 16 == 0)
        if not fused:
            total = residual.clone()
            for part in parts:
                total += part
            out.copy_(total)
            return self._reduce(out, path)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        self._one_shot.all_reduce_sum(parts.data_ptr(), parts.shape[0], residual.data_ptr(), out.data_ptr(),
                                      out.numel(), _dtype_name(out), stream, _pdl(self.device))
        return out

    def all_reduce_async(self, t: torch.Tensor) -> PendingReduce:
        """Start the reduction of t on the communication stream (after the current stream's work so
        far); `.wait()` orders the current stream after it and returns t. Work issued in between
        overlaps with the reduction (the micro-batched prefill, rank.py); the copy-engine path where it
        can run, else as all_reduce would."""
        path = self._path(t, overlapped=True)
        if path is None:
            return PendingReduce(t)
        if self.comm_stream is None:  # CPU (gloo): torch.distributed's own async work
            return PendingReduce(t, work=dist.all_reduce(t, group=self.group, async_op=True))
        self.comm_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.comm_stream):
            if path == "copy_engine":
                self._copy_engine.all_reduce(t.data_ptr(), t.numel(), _dtype_name(t), self.comm_stream.cuda_stream)
            elif path == "one_shot":
                self._launch_one_shot(t, self.comm_stream)
            else:
                dist.all_reduce(t, group=self.group)
        if not torch.cuda.is_current_stream_capturing():  # a graph's memory pool keeps t alive anyway
            t.record_stream(self.comm_stream)
        done = torch.cuda.Event()
        done.record(self.comm_stream)
        return PendingReduce(t, event=done)

    def _path(self, t: torch.Tensor, overlapped: bool = False) -> str | None:
        if self.skip_for_benchmark:
            return None
        path, why = self.policy(t, overlapped)
        self.calls[path] += 1
        if why is not None:
            self.last_reason = why
        return path

    def _launch_one_shot(self, t: torch.Tensor, stream, pdl: bool = False) -> None:
        """pdl: launch with programmatic dependent launch (ops/_pdl.py), for a call on the current stream
        right after one of our kernels; the communication stream's calls follow an event instead."""
        self._one_shot.all_reduce(t.data_ptr(), t.data_ptr(), t.numel(), _dtype_name(t), stream.cuda_stream, pdl)

    def check_health(self) -> None:
        """RuntimeError when a one-shot call timed out waiting for a peer (a dead or stuck rank)."""
        if self._one_shot is not None and self._one_shot.timed_out():
            raise RuntimeError("the one-shot all-reduce timed out waiting for another rank (did a rank die?)")


def _pdl(device: torch.device) -> bool:
    """Whether the one-shot kernel is launched with PDL: where our Triton kernels are (ops/_pdl.py).
    Without Triton (a CPU install; the torch backend's ranks) none of them runs."""
    try:
        from ..ops._pdl import pdl_enabled
    except ImportError:
        return False
    return pdl_enabled(device)


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).split(".")[-1]


class PendingReduce:
    def __init__(self, t: torch.Tensor, work=None, event: torch.cuda.Event | None = None):
        self.t, self.work, self.event = t, work, event

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
        if self.event is not None:
            torch.cuda.current_stream(self.t.device).wait_event(self.event)
        return self.t


def global_rank(group, i: int) -> int:
    """The world rank of rank i of `group` (None: the world): what point-to-point ops and `src=` take."""
    return i if group is None else dist.get_global_rank(group, i)


def exchange_bypass(a: torch.Tensor, j: int, P: int, d: int, group=None):
    """Rank j of a group of P ranks: send a (= a_j) to ranks j+1..j+d of the group, receive a_{j-1..j-d}.

    Returns (b, sends): b = a_{j-min(d,j)} + ... + a_{j-1} (None when j = 0 or d = 0), and the pending
    sends, to `.wait()` after the MLP. j and the peers are ranks of the process group `group`.
    """
    if d == 0 or P == 1:
        return None, []
    sources = list(range(max(0, j - d), j))
    received = [torch.empty_like(a) for _ in sources]
    ops = [dist.P2POp(dist.irecv, buf, global_rank(group, i), group) for i, buf in zip(sources, received)]
    ops += [dist.P2POp(dist.isend, a, global_rank(group, i), group) for i in range(j + 1, min(P, j + d + 1))]
    if not ops:
        return None, []
    works = dist.batch_isend_irecv(ops)
    for work in works[:len(sources)]:
        work.wait()
    return bypass_sum(received), works[len(sources):]


def gather_bypass(a: torch.Tensor | None, j: int, P: int, d: int, reducer: GroupReducer,
                  like: torch.Tensor) -> torch.Tensor | None:
    """exchange_bypass's b for rank j of a group of P ranks, moved by one all-reduce (`reducer`) that
    every rank of the reducer's group must join: a = a_j (None on a rank idle for this group, j >= P);
    like: a tensor of a_j's shape, dtype and device. Ranks 0..P-2 write a_j into row j of a zeroed
    [P-1, *shape] buffer (a_{P-1} is received by no one); the sum over ranks holds every a_i exactly
    (x + 0 == x). Returns b = a_{j-min(d,j)} + ... + a_{j-1}, summed in group order as exchange_bypass
    and the single-process model do (None when j = 0, j >= P or d = 0)."""
    if d == 0 or P == 1:
        return None
    rows = torch.zeros((P - 1, *like.shape), dtype=like.dtype, device=like.device)
    if a is not None and j < P - 1:
        rows[j].copy_(a)
    reducer.all_reduce(rows)
    return None if j >= P else bypass_sum([rows[i] for i in range(max(0, j - d), j)])


def bypass_sum(received: list[torch.Tensor]) -> torch.Tensor | None:
    """b = a_{j-min(d,j)} + ... + a_{j-1} from the received a_i in group order, added one at a time as the
    single-process model adds them: both exchanges go through here, so they agree bit for bit."""
    b = None
    for a in received:
        b = a if b is None else b + a
    return b
