// PeerMemory: see peer_memory.h.

#include "peer_memory.h"

#include <cuda_runtime.h>

#include <cstring>
#include <stdexcept>

#include "cuda_check.h"
#include "pack.cuh"

namespace cqil {

PeerMemory::PeerMemory(int device, int rank, int world, std::size_t bytes, std::size_t zeroed)
    : device_(device), rank_(rank), world_(world) {
  if (world < 1 || world > kMaxRanks) throw std::runtime_error("peer memory: world must be 1..8");
  if (rank < 0 || rank >= world) throw std::runtime_error("peer memory: rank out of range");
  check(cudaSetDevice(device), "cudaSetDevice");
  check(cudaMalloc(&buffer_, bytes), "cudaMalloc (peer buffer)");
  check(cudaMemset(buffer_, 0, zeroed), "cudaMemset (peer buffer flags)");
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  peers_[rank] = buffer_;
}

PeerMemory::~PeerMemory() {
  cudaSetDevice(device_);
  for (int r = 0; r < world_; ++r) {
    if (r != rank_ && peers_[r] != nullptr) cudaIpcCloseMemHandle(peers_[r]);
  }
  if (buffer_ != nullptr) cudaFree(buffer_);
}

std::string PeerMemory::ipc_handle() const {
  cudaIpcMemHandle_t handle;
  check(cudaIpcGetMemHandle(&handle, buffer_), "cudaIpcGetMemHandle");
  return std::string(reinterpret_cast<const char*>(&handle), sizeof(handle));
}

std::string PeerMemory::pci_bus_id() const {
  char id[32] = {};
  check(cudaDeviceGetPCIBusId(id, sizeof(id), device_), "cudaDeviceGetPCIBusId");
  return std::string(id);
}

void PeerMemory::open_peers(const std::vector<std::string>& handles, const std::vector<std::string>& bus_ids) {
  if (opened_) throw std::runtime_error("peer memory: peers already opened");
  if (static_cast<int>(handles.size()) != world_ || static_cast<int>(bus_ids.size()) != world_) {
    throw std::runtime_error("peer memory: need one IPC handle and bus id per rank");
  }
  check(cudaSetDevice(device_), "cudaSetDevice");
  for (int r = 0; r < world_; ++r) {
    if (r == rank_) continue;
    int peer_device = -1;
    if (cudaDeviceGetByPCIBusId(&peer_device, bus_ids[r].c_str()) != cudaSuccess) {
      cudaGetLastError();
      throw std::runtime_error("rank " + std::to_string(r) + "'s GPU " + bus_ids[r] +
                               " is not visible from this process");
    }
    int can = 1;  // two ranks on one GPU (a test setup) map each other's memory without peer access
    if (peer_device != device_) check(cudaDeviceCanAccessPeer(&can, device_, peer_device), "cudaDeviceCanAccessPeer");
    if (!can) {
      throw std::runtime_error("no peer access from GPU " + std::to_string(device_) + " to rank " +
                               std::to_string(r) + "'s GPU " + bus_ids[r]);
    }
    if (handles[r].size() != sizeof(cudaIpcMemHandle_t)) {
      throw std::runtime_error("rank " + std::to_string(r) + " sent a malformed IPC handle");
    }
    cudaIpcMemHandle_t handle;
    std::memcpy(&handle, handles[r].data(), sizeof(handle));
    void* ptr = nullptr;
    check(cudaIpcOpenMemHandle(&ptr, handle, cudaIpcMemLazyEnablePeerAccess), "cudaIpcOpenMemHandle");
    peers_[r] = static_cast<char*>(ptr);
  }
  opened_ = true;
}

std::size_t PeerMemory::check_message(std::uintptr_t ptr, std::size_t numel, const std::string& dtype,
                                      std::size_t max_bytes, const char* what) const {
  if (!opened()) throw std::runtime_error(std::string(what) + ": open_peers() first");
  const std::size_t bytes = numel * element_bytes(dtype, what);
  if (bytes > max_bytes || bytes % 16 || ptr % 16) {
    throw std::runtime_error(std::string(what) + ": message must be 16-byte aligned and at most max_bytes");
  }
  check(cudaSetDevice(device_), "cudaSetDevice");
  return bytes / 16;
}

}  // namespace cqil
