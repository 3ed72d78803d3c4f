// Prototype for the persistent decode step (issue 26), fourth stage: ring_chain.cu's weight ring for batches of
// 1 to 32 rows, the products on the tensor cores (mma.sync m16n8k16, bf16 in, fp32 sums). Built and loaded by
// benchmarks/ring_batch.py (nvcc, then ctypes, through ring_chain.py's builder); not part of the package.
//
// out_l[b] = W_l @ act_l[b] for every batch row b, layer after layer. A task is one m-tile of a layer: 16 rows
// of W, over all of K. Its weights are stored packed (ring_batch.py's pack): [N / 16, K / 16, 32 lanes, 8 bf16],
// lane (g, t) = (lane / 4, lane % 4) of k-tile kt holding the mma's A fragment a0..a3 =
//     W[g][4t, 4t+1], W[g + 8][4t, 4t+1], W[g][4t+2, 4t+3], W[g + 8][4t+2, 4t+3]      (k offsets within kt)
// so one 16-byte shared-memory read per lane and k-tile is a whole fragment, with no bank conflict. The mma's
// k order within a tile is permuted alike in A and B (a0/b0 take k 4t, 4t+1; a2/b1 take 4t+2, 4t+3), so B's
// fragment for batch row n = g + 8j is the 8 contiguous bytes act[n][16kt + 4t .. 16kt + 4t + 3], read from L2.
//
// A task's K is cut into pages of whole k-tiles, one ring slot each. Per block the host plans one page
// sequence (ring_batch.py's plan): the block's tasks in chain order, grouped in rounds of up to `consumers`
// tasks of one layer whose pages interleave (page 0 of each, then page 1 of each, ...), so the round's
// consumer warps work side by side. A round never mixes layers: a task waiting on the layer before must not
// hold a slot that a task of that layer needs.
//
// Each consumer warp has its own slots: warp w's e-th page goes to slot w * per + e % per (per = slots /
// consumers), its (e / per)-th use. A slot's barriers then see one consumer in order, so a phase parity names
// exactly one page by construction. (The first version shared the ring as ring_chain.cu does, page i in slot
// i % slots. A parity wait cannot tell phase k from k - 2, so that is exact only while no warp waits on a slot
// whose previous page is not yet copied; for plan's rounds the layer waits ensure it (the simulation in
// tests/test_ring_batch.py finds no such read), but the argument is subtle. That version hung on its first GPU
// run for a reason not found: see the watchdog.)
//
//   producer warp   walks the block's page list (32 descriptors per read, shuffled: source, bytes, slot, use)
//                   and copies each page into its slot with one bulk copy (TMA) as soon as the slot's previous
//                   page is consumed; it never waits on an activation.
//   consumer warps  walk their own work lists (one entry per page of their tasks, in page order): on a task's
//                   first page, wait until the layer before has all its tasks counted (acquire) and zero the
//                   sums; per page, wait for the slot, multiply its k-tiles, give the slot back; on the last
//                   page, store the 16 rows of every batch row. A warp adds its tasks of a layer to the
//                   layer's counter (fence, release) once it moves on to another layer.
// Deadlock: within a block, page positions follow chain order and a round holds one layer; every wait is on
// an earlier position of the block (a slot's previous page is its warp's earlier page) or on the layer before,
// which is earlier in every block; all blocks are resident (one per SM). tests/test_ring_batch.py simulates the
// protocol, barriers' parities included.

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ring_sync.cuh"

namespace {

using namespace ring;

constexpr int kMaxConsumers = 8;  // consumer warps of a block
constexpr int kTileBytes = 512;  // one packed 16 x 16 k-tile: 32 lanes x 16 bytes
constexpr int kFirst = 1, kLast = 2;
// prof's stamps of a page: the producer issued its copy; its consumer took it up, had x (the layer before
// complete: later pages of a task stamp the same as taken), had the slot's bytes, had multiplied (and stored)
constexpr int kStamps = 5;
// Watchdog: a wait that has not passed after kPatienceNs gives up. The first to give up writes diag[0..7] =
// {what (1 producer's empty wait, 2 consumer's counter wait, 3 consumer's full wait), block, warp, position in
// the block's page list, slot or layer, use or counter value, target (parity or task count), page list length}
// and every warp that gives up returns: a hang becomes an error ring_batch.py names (RingBatch.check).
constexpr long long kPatienceNs = 2000000000LL;

struct Page {                    // 24 bytes, written by ring_batch.py as 3 int64
  const void* src;               // the page's packed k-tiles
  int bytes;
  int slot;                      // its consumer warp's slot (w * per + e % per)
  int use;                       // the slot's use it is (e / per): the producer waits for use - 1 consumed
  int pad;
};
static_assert(sizeof(Page) == 24, "Page is 3 int64 on the Python side");

struct Work {                    // one page of one task of a consumer warp; 48 bytes, 6 int64 on the Python side
  const __nv_bfloat16* x;        // act_l[0][16 * first k-tile of the page]
  __nv_bfloat16* out;            // act_{l+1}[0][16 * m]
  int pos;                       // the page's position in the block's page list (its profile row)
  int tiles;                     // k-tiles in the page
  int layer;
  int wait_target;               // tasks of layer - 1 (0: layer 0, whose input is the chain's)
  int flags;                     // kFirst: the task's first page; kLast: its last
  int x_stride;                  // elements between batch rows of act_l
  int out_stride;                // and of act_{l+1}
  int k0;                        // the page's first k-tile within K (its parity picks the sums a tile goes to)
};
static_assert(sizeof(Work) == 48, "Work is 6 int64 on the Python side");

// d += a (16 x 16, the packed fragment) * b (16 x 8); fp32 sums.
__device__ __forceinline__ void mma16816(float (&d)[4], uint4 a, uint2 b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b.x), "r"(b.y));
}

// k-tiles per step of a page: the B fragments of unroll<NT> tiles (64 registers) are loaded from L2 before
// their products, so one round trip to L2 serves that many tiles.
template <int NT>
__host__ __device__ constexpr int unroll() { return NT == 1 ? 32 : NT == 2 ? 16 : 8; }

template <int NT>
__device__ __forceinline__ void swap_sums(float (&acc)[2][NT][4]) {  // register moves: indices known at compile time
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float v = acc[0][j][e];
      acc[0][j][e] = acc[1][j][e];
      acc[1][j][e] = v;
    }
  }
}

// The products of one page: `tiles` packed k-tiles in `w` (shared) against B fragments of the batch rows
// g + 8j < batch read from x (global, through L2: other blocks of this launch wrote it). NT n-tiles of 8 rows.
// Two sets of sums, even and odd k-tiles of K (k0: the page's first), so that two mma chains are in flight
// and a row's sums do not depend on how K is paged.
template <int NT>
__device__ __forceinline__ void page_mma(float (&acc)[2][NT][4], const uint4* w, const __nv_bfloat16* x,
                                         int x_stride, int tiles, int k0, int batch, int lane, bool compute) {
  if (!compute) return;
  const int g = lane >> 2, t = lane & 3;
  const uint2* xr[NT];
  bool live[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    live[j] = g + 8 * j < batch;
    xr[j] = reinterpret_cast<const uint2*>(x + static_cast<long long>(g + 8 * j) * x_stride + 4 * t);
  }
  constexpr int kUnroll = unroll<NT>();
  if (k0 & 1) swap_sums(acc);  // the page's even local tiles are odd ones of K: their sums go in set 0
  for (int c = 0; c < tiles; c += kUnroll) {
    uint2 b[kUnroll][NT];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        b[u][j] = make_uint2(0u, 0u);
        if (live[j] && c + u < tiles) b[u][j] = __ldcg(xr[j] + 4 * (c + u));  // 16 elements = 4 uint2 a tile
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (c + u < tiles) {
        const uint4 a = w[(c + u) * 32 + lane];
#pragma unroll
        for (int j = 0; j < NT; ++j) mma16816(acc[u & 1][j], a, b[u][j]);  // kUnroll is even
      }
    }
  }
  if (k0 & 1) swap_sums(acc);
}

// d0..d3 of n-tile j: rows g, g, g + 8, g + 8 of the task; batch rows 2t, 2t + 1, 2t, 2t + 1 (+ 8j).
template <int NT>
__device__ __forceinline__ void store_tile(const float (&acc)[2][NT][4], __nv_bfloat16* out, int out_stride,
                                           int batch, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int n = 8 * j + 2 * t + (e & 1), row = g + 8 * (e >> 1);
      const float v = acc[0][j][e] + acc[1][j][e];
      if (n < batch) out[static_cast<long long>(n) * out_stride + row] = __float2bfloat16(v);
    }
  }
}

struct Args {                    // the kernel's parameters (ring_batch_launch's)
  const Page* pages;             // every block's page list, block b's from page_off[b] to page_off[b + 1]
  const int* page_off;
  const Work* work;              // every consumer warp's work list, warp w of block b's from work_off[b * C + w]
  const int* work_off;
  unsigned* counters;            // per layer, its tasks stored
  long long* prof;               // optional: per page (page_off[b] + position), kStamps globaltimer ns
  long long* diag;               // [8], zero: the watchdog's report (kPatienceNs)
  int batch;
  int slot_bytes;
  int slots;
  int mode;
};

__device__ void give_up(long long* diag, int what, int warp, int pos, long long where, long long have,
                        long long want, int pages) {
  if (atomicCAS(reinterpret_cast<unsigned long long*>(diag), 0ull, static_cast<unsigned long long>(what)) == 0) {
    diag[1] = blockIdx.x;
    diag[2] = warp;
    diag[3] = pos;
    diag[4] = where;
    diag[5] = have;
    diag[6] = want;
    diag[7] = pages;
    __threadfence();
  }
}

// A consumer warp adds its `done` tasks to a layer's counter: every lane's stores fenced, then one release.
__device__ __forceinline__ void publish(unsigned* counter, unsigned done, int lane) {
  __threadfence();
  __syncwarp();
  if (lane == 0) red_release(counter, done);
}

// mode: 0 the chain; 1 stream only (no products: zeros stored); 2 compute only (no copies: the producer
// arrives on the slot's barrier at once, the consumers multiply whatever the slot holds). Modes 1 and 2 keep
// every wait and counter; their results are meaningless.
template <int NT>
__global__ void __launch_bounds__((kMaxConsumers + 1) * 32, 1) ring_batch_kernel(const Args a) {
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* ring = smem;
  std::uint64_t* full = reinterpret_cast<std::uint64_t*>(smem + a.slots * a.slot_bytes);
  std::uint64_t* empty = full + a.slots;
  const int slots = a.slots;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int consumers = blockDim.x / 32 - 1;
  if (threadIdx.x == 0) {
    for (int s = 0; s < slots; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 1);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  const long long deadline = global_ns() + kPatienceNs;
  if (warp == consumers) {  // producer
    const int p0 = a.page_off[blockIdx.x], n_pages = a.page_off[blockIdx.x + 1] - p0;
    for (int base = 0; base < n_pages; base += 32) {
      const int n = min(32, n_pages - base);
      Page held{};
      if (lane < n) held = a.pages[p0 + base + lane];
      for (int j = 0; j < n; ++j) {
        const auto src = reinterpret_cast<const void*>(
            __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(held.src), j));
        const auto bytes = static_cast<unsigned>(__shfl_sync(0xffffffffu, held.bytes, j));
        const int s = __shfl_sync(0xffffffffu, held.slot, j);
        const int use = __shfl_sync(0xffffffffu, held.use, j);
        const int i = base + j;
        int late = 0;
        if (lane == 0 && use > 0 && !mbar_wait_until(&empty[s], (use - 1) & 1, deadline)) {
          give_up(a.diag, 1, warp, i, s, use, (use - 1) & 1, n_pages);
          late = 1;
        }
        if (__shfl_sync(0xffffffffu, late, 0)) return;
        if (lane == 0) {
          if (a.prof) a.prof[static_cast<long long>(p0 + i) * kStamps] = global_ns();
          if (a.mode == 2) {
            mbar_arrive(&full[s]);
          } else {
            mbar_expect_tx(&full[s], bytes);
            bulk_copy(ring + s * a.slot_bytes, src, bytes, &full[s]);
          }
        }
        __syncwarp();
      }
    }
    return;
  }

  const int per = slots / consumers;  // this warp's slots: warp * per .. warp * per + per - 1
  const int list = blockIdx.x * consumers + warp;
  const int w0 = a.work_off[list], n_work = a.work_off[list + 1] - w0;
  float acc[2][NT][4];
  int done_layer = 0, ready_layer = 0;
  unsigned done = 0;
  for (int base = 0; base < n_work; base += 32) {
    const int n = min(32, n_work - base);
    Work held{};
    if (lane < n) held = a.work[w0 + base + lane];
    for (int j = 0; j < n; ++j) {
      const auto x = reinterpret_cast<const __nv_bfloat16*>(
          __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(held.x), j));
      const int pos = __shfl_sync(0xffffffffu, held.pos, j);
      const int tiles = __shfl_sync(0xffffffffu, held.tiles, j);
      const int layer = __shfl_sync(0xffffffffu, held.layer, j);
      const int flags = __shfl_sync(0xffffffffu, held.flags, j);
      const int x_stride = __shfl_sync(0xffffffffu, held.x_stride, j);
      const int k0 = __shfl_sync(0xffffffffu, held.k0, j);
      const int e = base + j, s = warp * per + e % per;  // the e-th page of this warp
      long long* stamp =
          a.prof && lane == 0 ? a.prof + static_cast<long long>(a.page_off[blockIdx.x] + pos) * kStamps : nullptr;
      const long long taken = stamp ? global_ns() : 0;
      if (stamp) stamp[1] = taken;
      if (flags & kFirst) {
        if (done && layer != done_layer) {  // before any wait on this layer's input
          publish(a.counters + done_layer, done, lane);
          done = 0;
        }
        const int wait_target = __shfl_sync(0xffffffffu, held.wait_target, j);
        if (wait_target > 0 && ready_layer < layer) {
          while (true) {  // every lane acquires (its own later loads of x are ordered after); the vote keeps
            // the warp together
            const unsigned seen = load_acquire(a.counters + layer - 1);
            if (__all_sync(0xffffffffu, seen >= static_cast<unsigned>(wait_target))) break;
            if (__any_sync(0xffffffffu, global_ns() > deadline)) {
              if (lane == 0) give_up(a.diag, 2, warp, pos, layer, seen, wait_target, n_work);
              return;
            }
          }
          ready_layer = layer;
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
          for (int q = 0; q < NT; ++q) acc[h][q][0] = acc[h][q][1] = acc[h][q][2] = acc[h][q][3] = 0.f;
        }
      }
      if (stamp) stamp[2] = flags & kFirst ? global_ns() : taken;
      if (!__all_sync(0xffffffffu, mbar_wait_until(&full[s], (e / per) & 1, deadline))) {
        if (lane == 0) give_up(a.diag, 3, warp, pos, s, e / per, (e / per) & 1, n_work);
        return;
      }
      if (stamp) stamp[3] = global_ns();
      page_mma<NT>(acc, reinterpret_cast<const uint4*>(ring + s * a.slot_bytes), x, x_stride, tiles, k0, a.batch,
                   lane, a.mode != 1);
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[s]);  // the page's bytes are in the sums: refill the slot
      if (flags & kLast) {
        const auto out = reinterpret_cast<__nv_bfloat16*>(
            __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(held.out), j));
        const int out_stride = __shfl_sync(0xffffffffu, held.out_stride, j);
        store_tile<NT>(acc, out, out_stride, a.batch, lane);
        done_layer = layer;
        ++done;
      }
      if (stamp) stamp[4] = global_ns();
    }
  }
  if (done) publish(a.counters + done_layer, done, lane);
}

template <int NT>
cudaError_t launch(const Args& a, int consumers, int grid, int smem, cudaStream_t st) {
  cudaError_t err = cudaFuncSetAttribute(ring_batch_kernel<NT>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  ring_batch_kernel<NT><<<grid, (consumers + 1) * 32, smem, st>>>(a);
  return cudaGetLastError();
}

}  // namespace

extern "C" const char* ring_batch_error(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

// Zeroes the layers' counters and launches the chain on `stream` (capturable). Returns a cudaError_t.
extern "C" int ring_batch_launch(const void* pages, const int* page_off, const void* work, const int* work_off,
                                 unsigned* counters, long long* prof, long long* diag, int layers, int batch,
                                 int slot_bytes, int slots, int consumers, int grid, int mode, void* stream) {
  if (consumers < 1 || consumers > kMaxConsumers || slots < 1 || slots % consumers || batch < 1 || batch > 32 ||
      mode < 0 || mode > 2 || slot_bytes % kTileBytes)
    return cudaErrorInvalidValue;
  const auto st = static_cast<cudaStream_t>(stream);
  const int smem = slots * slot_bytes + 2 * slots * 8;
  cudaError_t err = cudaMemsetAsync(counters, 0, sizeof(unsigned) * layers, st);
  if (err != cudaSuccess) return err;
  const Args a{static_cast<const Page*>(pages), page_off, static_cast<const Work*>(work), work_off, counters, prof,
               diag, batch, slot_bytes, slots, mode};
  switch ((batch + 7) / 8) {
    case 1: return launch<1>(a, consumers, grid, smem, st);
    case 2: return launch<2>(a, consumers, grid, smem, st);
    case 3: return launch<3>(a, consumers, grid, smem, st);
    default: return launch<4>(a, consumers, grid, smem, st);
  }
}
