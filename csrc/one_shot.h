// One-shot all-reduce (sum) over the GPUs of one host through peer-accessible memory: a decode step's
// hidden state (one token x hidden, a few KB) is summed in one kernel launch that every rank runs at the
// same time, instead of NCCL's ring (measured 18 us on 2 H100s for 8 KB). Each rank reads every other
// rank's whole message, so on 2 GPUs it also beats NCCL for a prefill's megabytes (parallel/comm.py's
// default_one_shot_bytes says up to which size it is used).
//
// Each rank owns one device buffer, shared with the other ranks through CUDA IPC handles (exchanged by
// the caller, parallel/comm.py, over torch.distributed):
//     flags [kBlocks][kMaxRanks] uint32      written by the other ranks: "block b of rank r arrived at
//                                            generation g"
//     data  [2][max_bytes]                   this rank's input, double-buffered by generation parity
// A call (generation g, kept per block in device memory, so CUDA graph replays advance it):
//   1. each block copies its slice of the input into data[g & 1] of its own buffer;
//   2. it writes g into flags[b][rank] of every rank's buffer (release, system scope);
//   3. it waits until flags[b][r] >= g in its own buffer for every rank r (acquire), or the timeout;
//   4. it sums the slice over the ranks' data[g & 1] in rank order 0, 1, ... in fp32 and writes the output.
// Every rank therefore gets the same bits. Double buffering makes a second barrier unnecessary: a rank
// overwrites data[g & 1] only after every peer has signalled generation g - 1, which each peer does
// after its call g - 2 (the last reader of that slot) has finished — calls on one stream do not overlap,
// and every call runs all kBlocks blocks, so g is the same for all blocks of a call.
//
// A peer that never arrives (dead, or stuck) does not hang the GPU: after `timeout_s` the kernel sets a
// host-visible error flag and returns (timed_out() reads it; the output is then garbage).
//
// Only plain C++ types cross this header (pointers and stream handles as integers): the extension never
// compiles against torch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "peer_memory.h"

namespace cqil {

constexpr int kBlocks = 32;  // every call runs exactly this many blocks
constexpr int kMaxParts = 8;  // all_reduce_sum's partial products

class OneShotAllReduce {
 public:
  // Allocates this rank's buffer on `device` (flags zeroed) and a host-mapped error flag.
  OneShotAllReduce(int device, int rank, int world, std::size_t max_bytes, double timeout_s);
  ~OneShotAllReduce();
  OneShotAllReduce(const OneShotAllReduce&) = delete;
  OneShotAllReduce& operator=(const OneShotAllReduce&) = delete;

  // This rank's shared buffer (peer_memory.h): its IPC handle goes to the other ranks, which open it.
  PeerMemory& memory() { return memory_; }

  // out = sum over ranks of in (numel elements of dtype "float32" | "float16" | "bfloat16"), launched on
  // `stream`; in == out is allowed. numel * element size must be a multiple of 16 bytes, at most
  // max_bytes, and both pointers 16-byte aligned (the caller's policy checks; this throws otherwise).
  // pdl: launch with programmatic dependent launch (compute capability 9.0 and later): the kernel may
  // start while the previous one on the stream finishes, and waits for it before touching memory.
  void all_reduce(std::uintptr_t in, std::uintptr_t out, std::size_t numel, const std::string& dtype,
                  std::uintptr_t stream, bool pdl);
  // The same, where each rank's message is formed in the kernel's first step from fp32 inputs:
  // in = residual + parts[0] + ... + parts[n_parts - 1], added in that order in fp32 and rounded once to
  // dtype (a split-K GEMM's partial products and the residual: one launch less than summing them first).
  // parts: n_parts contiguous rows of numel fp32; residual: numel fp32; both 16-byte aligned.
  void all_reduce_sum(std::uintptr_t parts, int n_parts, std::uintptr_t residual, std::uintptr_t out,
                      std::size_t numel, const std::string& dtype, std::uintptr_t stream, bool pdl);
  // True once any call gave up waiting for a peer.
  bool timed_out() const;

  std::size_t max_bytes() const { return max_bytes_; }

 private:
  // One launch of the kernel for element type T, its contribution read through `source` (one_shot.cu).
  template <typename T, typename Source>
  void launch(const Source& source, std::uintptr_t out, std::size_t n16, std::uintptr_t stream, bool pdl) const;
  PeerMemory memory_;                  // own IPC buffer (flags, then 2 data slots) and the peers'
  std::size_t max_bytes_;
  long long timeout_ns_;
  std::uint32_t* counters_ = nullptr;  // per-block generation, device memory (not shared)
  int* error_host_ = nullptr;       // host-mapped error flag
  int* error_device_ = nullptr;
};

}  // namespace cqil
