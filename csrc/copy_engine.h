// Copy-engine all-reduce (sum) over the GPUs of one host, for the reductions of a prefill that overlap
// with compute (parallel/rank.py's micro-batches). It uses no SM while it moves data and while it waits
// for the other ranks: the message goes to the peers by DMA (cudaMemcpyAsync into their IPC-mapped
// buffers, NVLink's copy engines), and the ranks signal each other with stream memory operations
// (cuStreamWriteValue32 / cuStreamWaitValue32, executed by the GPU's front end). Only the final sum
// (a few microseconds for a prefill's megabytes, local memory only) is a kernel. An SM-resident kernel
// that waits for a peer (the one-shot all-reduce, NCCL) takes SMs from the GEMMs it is meant to hide
// under; this one does not.
//
// Each rank owns one buffer (peer_memory.h):
//     ready [kSlots][kMaxRanks] uint32   ready[s][r] = 1: rank r's message is in my data[s][r]
//     busy  [kSlots][kMaxRanks] uint32   busy[s][p] = 1: my message sits in rank p's data[s][me],
//                                        not yet consumed (p clears it)
//     data  [kSlots][world][max_bytes]
// A call takes slot s (alternating) and, on `stream`, in this order:
//   for every peer p: wait busy[s][p] == 0; set busy[s][p] = 1; copy the message into p's data[s][me];
//                     write 1 into p's ready[s][me] (the write is fenced after the copy);
//   for every peer p: wait ready[s][p] == 1; set ready[s][p] = 0;
//   sum kernel: message = sum over ranks in rank order (own message for me, data[s][r] otherwise), in
//               fp32, rounded once: the same bits on every rank, and as the one-shot kernel's;
//   for every peer p: write 0 into p's busy[s][me] (its slot in my buffer is free again).
// Every flag returns to its initial value, and the values written are constants, so the calls can be
// captured in a CUDA graph and replayed; a slot is never overwritten before its reader has summed it.
//
// The waits have no timeout: a rank that dies leaves its peers' communication streams waiting, and
// the process-level supervision ends them (the in-process driver or torchrun terminates the other
// ranks when one fails; parallel/driver.py). Decode's reductions, which run on the compute stream,
// take the one-shot kernel, which times out instead.
//
// Only plain C++ types cross this header (pointers and stream handles as integers).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "peer_memory.h"

namespace cqil {

class CopyEngineAllReduce {
 public:
  static constexpr int kSlots = 2;

  // Allocates this rank's buffer on `device` (flags zeroed); throws std::runtime_error when the driver
  // lacks stream memory operations.
  CopyEngineAllReduce(int device, int rank, int world, std::size_t max_bytes);
  CopyEngineAllReduce(const CopyEngineAllReduce&) = delete;
  CopyEngineAllReduce& operator=(const CopyEngineAllReduce&) = delete;

  PeerMemory& memory() { return memory_; }

  // data = sum over ranks of data (numel elements of dtype "float32" | "float16" | "bfloat16", in
  // place), enqueued on `stream`. numel * element size must be a multiple of 16 bytes and at most
  // max_bytes, the pointer 16-byte aligned (the caller's policy checks; this throws otherwise).
  void all_reduce(std::uintptr_t data, std::size_t numel, const std::string& dtype, std::uintptr_t stream);

  std::size_t max_bytes() const { return max_bytes_; }

 private:
  std::uint32_t* ready(int owner, int slot, int src) const;
  std::uint32_t* busy(int owner, int slot, int dst) const;
  char* data(int owner, int slot, int src) const;

  PeerMemory memory_;
  std::size_t max_bytes_;
  int next_slot_ = 0;
};

}  // namespace cqil
