// Prototype for the persistent decode step (issue 26), third stage: the GEMV chain of persistent_chain.py in
// one launch whose weight stream never waits on activations. Built and loaded by benchmarks/ring_chain.py
// (nvcc, then ctypes); not part of the package.
//
// One block per SM. Its tasks are the chain's tasks g = blockIdx.x, blockIdx.x + gridDim.x, ... in order
// (layers in order, then rows). A task is `rows` whole rows of one layer's weight [N, K], a contiguous
// rows * K * 2 bytes, and stores out[row0 : row0 + rows] = W[row0 : row0 + rows] @ x.
//
//   producer warp   one thread walks the block's tasks and copies each task's weight rows into slot
//                   i % slots of a shared-memory ring with one bulk copy (TMA, cp.async.bulk), as soon as
//                   the slot is free. Weights never depend on activations, so it never waits on another
//                   block: across layer boundaries, while the consumers wait for their input, the ring
//                   keeps filling with the next tasks' weights.
//   consumer warps  warp w takes the block's tasks i = w, w + consumers, ...: waits for x in shared memory,
//                   then for the slot's bytes, multiplies, gives the slot back and stores its rows; it adds
//                   its tasks of a layer to the layer's counter (release) once it moves on to another layer.
// Task descriptors are read 32 at a time, one per lane, and handed round with shuffles: one read of global
// memory (whose latency is long while the weights stream) per 32 tasks instead of one per task.
//
// x of layer l (the output of layer l - 1) is read from global memory once per block and layer, into one of
// two shared buffers (l & 1), by the warp of the block's first task of that layer, after layer l - 1's
// counter has reached its task count (acquire); a tag per buffer (the layer it holds) tells the block's other
// warps. Two buffers are enough: a warp reaches a task of layer l + 2 only after all of layer l + 1 is done,
// which needs all of layer l done, so no task still reads the buffer it overwrites. No task waits on a task of
// a later position in the chain, a warp publishes its count of a layer before any wait of its next task, and
// every block is resident (one per SM, the grid no larger than the SM count), so no order of scheduling can
// deadlock.
//
// Sums: each lane accumulates its 8-element chunks of K in order in fp32 (chunks lane, lane + 32, ...), even and
// odd elements apart, then even + odd and a butterfly over the warp; bf16 out.

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ring_gemv.cuh"
#include "ring_sync.cuh"

namespace {

using namespace ring;

constexpr int kMaxConsumers = 8;  // consumer warps of a block (a task's rows: 1, 2, 4 or 8, ring_chain.py's plan)
// prof (optional): per task, globaltimer ns when the producer issued its copy, when its consumer took it up, had
// x, had the slot's bytes, and had stored its rows
constexpr int kStamps = 5;

struct Task {                    // 48 bytes, written by ring_chain.py as 6 int64
  const __nv_bfloat16* w;        // [rows, K], contiguous
  const __nv_bfloat16* x;        // [K]
  __nv_bfloat16* out;            // [rows]
  int K;
  int rows;
  int layer;                     // counter this task adds to once stored
  int wait_target;               // tasks of layer - 1 (0 for layer 0: x is the chain's input)
  int first;                     // 1: the block's first task of its layer (its warp stages x)
  int pad;
};
static_assert(sizeof(Task) == 48, "Task is 6 int64 on the Python side");

// The R rows of one task from the slot: out[r] = w[r] . x, stored (bf16) by lane 0.
template <int R>
__device__ __forceinline__ void task_rows(const uint4* w, const uint4* xs, int chunks, int lane,
                                          __nv_bfloat16* out, bool compute) {
  float even[R], odd[R];
#pragma unroll
  for (int r = 0; r < R; ++r) even[r] = odd[r] = 0.f;
  if (compute) {
    for (int c = lane; c < chunks; c += 32) {
      const uint4 xv = xs[c];
      const float xf[8] = {lo(xv.x), hi(xv.x), lo(xv.y), hi(xv.y), lo(xv.z), hi(xv.z), lo(xv.w), hi(xv.w)};
#pragma unroll
      for (int r = 0; r < R; ++r) dot8(w[r * chunks + c], xf, even[r], odd[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float v = even[r] + odd[r];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) out[r] = __float2bfloat16(v);  // every lane has the sum: lane 0 stores all R
  }
}

// mode (ring_chain.py's diagnostic variants): 0 the chain; 1 stream only (consumers skip the products and store
// zeros); 2 compute only (the producer fills no slot: it arrives on the slot's barrier at once and the consumers
// multiply whatever the slot holds). Modes 1 and 2 keep every wait and counter; their results are meaningless.
__global__ void __launch_bounds__((kMaxConsumers + 1) * 32, 1)
    ring_chain_kernel(const Task* __restrict__ tasks, int n_tasks, unsigned* counters, int slot_bytes, int slots,
                      int x_bytes, int mode, long long* prof) {
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* ring = smem;
  unsigned char* xbufs = smem + slots * slot_bytes;  // two buffers of x_bytes
  std::uint64_t* full = reinterpret_cast<std::uint64_t*>(smem + slots * slot_bytes + 2 * x_bytes);
  std::uint64_t* empty = full + slots;
  // [2]: layer + 1 of the x in buffer b, written by the warp that staged it. An exact tag, not an mbarrier's
  // phase: a warp whose block has no task in a layer it skips goes on to a later layer's task and would read
  // a phase parity that an older fill already completed (seen on odd shapes: a warp used layer l - 2's x).
  volatile int* x_layer = reinterpret_cast<volatile int*>(empty + slots);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int consumers = blockDim.x / 32 - 1;
  const int mine = blockIdx.x < n_tasks ? (n_tasks - 1 - blockIdx.x) / gridDim.x + 1 : 0;
  if (threadIdx.x == 0) {
    for (int s = 0; s < slots; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 1);
    }
    x_layer[0] = x_layer[1] = 0;
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp == consumers) {  // producer: lane j reads task base + j's source and size, lane 0 issues the copies
    for (int base = 0; base < mine; base += 32) {
      const int n = min(32, mine - base);
      const __nv_bfloat16* src = nullptr;
      unsigned bytes = 0;
      if (lane < n) {
        const Task* t = tasks + blockIdx.x + (base + lane) * gridDim.x;
        src = t->w;
        bytes = static_cast<unsigned>(t->rows) * t->K * 2;
      }
      for (int j = 0; j < n; ++j) {
        const auto src_j = reinterpret_cast<const __nv_bfloat16*>(
            __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(src), j));
        const unsigned bytes_j = __shfl_sync(0xffffffffu, bytes, j);
        if (lane == 0) {
          const int i = base + j, s = i % slots;
          if (i >= slots) mbar_wait(&empty[s], ((i / slots) - 1) & 1);
          if (prof) prof[(blockIdx.x + i * gridDim.x) * kStamps] = global_ns();
          if (mode == 2) {
            mbar_arrive(&full[s]);
          } else {
            mbar_expect_tx(&full[s], bytes_j);
            bulk_copy(ring + s * slot_bytes, src_j, bytes_j, &full[s]);
          }
        }
        __syncwarp();
      }
    }
    return;
  }

  // consumer warp: its k-th task is i = warp + k * consumers; lane j holds the descriptor of its task base + j.
  // Its tasks are counted once per layer (done tasks of done_layer, added when it moves on to another layer or
  // ends): a release makes the warp wait until its stores are visible, about a microsecond while the weights
  // stream, and the next layer waits for all of this one anyway.
  const int my_tasks = mine > warp ? (mine - 1 - warp) / consumers + 1 : 0;
  int done_layer = 0;
  unsigned done = 0;
  for (int base = 0; base < my_tasks; base += 32) {
    const int n = min(32, my_tasks - base);
    Task held{};
    if (lane < n) held = tasks[blockIdx.x + (warp + (base + lane) * consumers) * gridDim.x];
    for (int j = 0; j < n; ++j) {
      const int i = warp + (base + j) * consumers, s = i % slots;
      const auto x = reinterpret_cast<const __nv_bfloat16*>(
          __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(held.x), j));
      const auto out = reinterpret_cast<__nv_bfloat16*>(
          __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(held.out), j));
      const int K = __shfl_sync(0xffffffffu, held.K, j);
      const int rows = __shfl_sync(0xffffffffu, held.rows, j);
      const int layer = __shfl_sync(0xffffffffu, held.layer, j);
      const int wait_target = __shfl_sync(0xffffffffu, held.wait_target, j);
      const int first = __shfl_sync(0xffffffffu, held.first, j);
      const int b = layer & 1;
      long long* stamp = prof && lane == 0 ? prof + (blockIdx.x + i * gridDim.x) * kStamps : nullptr;
      if (done && layer != done_layer) {  // before any wait on this layer's input
        if (lane == 0) red_release(counters + done_layer, done);
        done = 0;
      }
      if (stamp) stamp[1] = global_ns();
      if (first) {  // this warp brings the layer's x in for the block
        if (wait_target > 0) {
          while (load_acquire(counters + layer - 1) < static_cast<unsigned>(wait_target)) {
          }
        }
        stage_x(reinterpret_cast<uint4*>(xbufs + b * x_bytes), x, K, lane);
        __syncwarp();
        if (lane == 0) {
          __threadfence_block();
          x_layer[b] = layer + 1;
        }
      } else {
        while (x_layer[b] != layer + 1) {
        }
        __threadfence_block();
      }
      __syncwarp();
      if (stamp) stamp[2] = global_ns();
      mbar_wait(&full[s], (i / slots) & 1);
      if (stamp) stamp[3] = global_ns();
      const uint4* w = reinterpret_cast<const uint4*>(ring + s * slot_bytes);
      const uint4* xs = reinterpret_cast<const uint4*>(xbufs + b * x_bytes);
      const bool compute = mode != 1;
      switch (rows) {
        case 1: task_rows<1>(w, xs, K / 8, lane, out, compute); break;
        case 2: task_rows<2>(w, xs, K / 8, lane, out, compute); break;
        case 4: task_rows<4>(w, xs, K / 8, lane, out, compute); break;
        default: task_rows<8>(w, xs, K / 8, lane, out, compute); break;  // 8
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[s]);  // the slot's bytes are read (the sums needed them): refill it
      if (stamp) stamp[4] = global_ns();
      done_layer = layer;
      ++done;
    }
  }
  if (done && lane == 0) red_release(counters + done_layer, done);  // after lane 0's stores of the rows
}

}  // namespace

extern "C" const char* ring_chain_error(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

// Zeroes the layers' counters and launches the chain on `stream` (capturable). Returns a cudaError_t.
extern "C" int ring_chain_launch(const void* tasks, int n_tasks, unsigned* counters, int layers, int slot_bytes,
                                 int slots, int consumers, int x_bytes, int grid, int mode, long long* prof,
                                 void* stream) {
  if (consumers < 1 || consumers > kMaxConsumers || slots < 1 || slots % consumers || mode < 0 || mode > 2)
    return cudaErrorInvalidValue;
  const auto st = static_cast<cudaStream_t>(stream);
  const int smem = slots * slot_bytes + 2 * x_bytes + 2 * slots * 8 + 16;
  cudaError_t err = cudaFuncSetAttribute(ring_chain_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  err = cudaMemsetAsync(counters, 0, sizeof(unsigned) * layers, st);
  if (err != cudaSuccess) return err;
  ring_chain_kernel<<<grid, (consumers + 1) * 32, smem, st>>>(static_cast<const Task*>(tasks), n_tasks, counters,
                                                               slot_bytes, slots, x_bytes, mode, prof);
  return cudaGetLastError();
}
