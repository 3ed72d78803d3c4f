// One device buffer per rank, shared with the other ranks of one host through CUDA IPC handles: the
// memory both all-reduces (one_shot.h, copy_engine.h) signal and move data through.
//
// The handles and bus ids are exchanged by the caller (parallel/comm.py, over torch.distributed); this
// class only allocates, exports and opens. Only plain C++ types cross this header.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace cqil {

constexpr int kMaxRanks = 8;

class PeerMemory {
 public:
  // Allocates `bytes` on `device`, the first `zeroed` of them set to zero.
  PeerMemory(int device, int rank, int world, std::size_t bytes, std::size_t zeroed);
  ~PeerMemory();
  PeerMemory(const PeerMemory&) = delete;
  PeerMemory& operator=(const PeerMemory&) = delete;

  // The CUDA IPC handle of this rank's buffer (opaque bytes) and this GPU's PCI bus id.
  std::string ipc_handle() const;
  std::string pci_bus_id() const;

  // Open every other rank's buffer. Throws std::runtime_error (naming the peer and the reason) when a
  // peer GPU is not visible here or not peer-accessible from this one.
  void open_peers(const std::vector<std::string>& handles, const std::vector<std::string>& bus_ids);
  bool opened() const { return opened_ || world_ == 1; }

  // The checks every all-reduce call through this memory makes on a message of numel elements of
  // dtype at `ptr` (peers opened; at most max_bytes; its size and address 16-byte aligned: throws
  // std::runtime_error naming `what` otherwise), then makes the device current. Returns the message's
  // size in 16-byte units.
  std::size_t check_message(std::uintptr_t ptr, std::size_t numel, const std::string& dtype,
                            std::size_t max_bytes, const char* what) const;

  // Rank r's buffer as seen from this device (this rank's own for r == rank).
  char* base(int r) const { return peers_[r]; }
  int device() const { return device_; }
  int rank() const { return rank_; }
  int world() const { return world_; }

 private:
  int device_, rank_, world_;
  char* buffer_ = nullptr;
  char* peers_[kMaxRanks] = {};
  bool opened_ = false;
};

}  // namespace cqil
