// Prototype for the persistent decode step (issue 26), fourth stage: ring_chain.cu's weight ring for batches of
// 1 to 32 rows, the products on the tensor cores (mma.sync m16n8k16, bf16 in, fp32 sums). Built and loaded by
// benchmarks/ring_batch.py (nvcc, then ctypes, through ring_chain.py's builder); not part of the package.
//
// out_l[b] = W_l @ act_l[b] for every batch row b, layer after layer. A task is MT m-tiles of a layer (a panel of
// 16 * MT rows of W) over one k-range of K (all of K, or one of the layer's `splits` ranges of whole 4-k-tile
// groups), and the whole block works on it: its weights are stored packed (ring_batch.py's pack) as
// [N / (16 MT), K / 16, MT, 32 lanes, 8 bf16], lane (g, t) = (lane / 4, lane % 4) of k-tile kt and m-tile mt
// holding the mma's A fragment a0..a3 =
//     W[g][4t, 4t+1], W[g + 8][4t, 4t+1], W[g][4t+2, 4t+3], W[g + 8][4t+2, 4t+3]      (k offsets within kt)
// so one 16-byte shared-memory read per lane, k-tile and m-tile is a whole fragment, with no bank conflict. The
// mma's k order within a tile is permuted alike in A and B (a0/b0 take k 4t, 4t+1; a2/b1 take 4t+2, 4t+3), so
// B's fragment for batch row n = g + 8j is the 8 contiguous bytes act[n][16kt + 4t .. 16kt + 4t + 3]: read
// from L2 at batch 1 to 8, from the block's copy of its k-range of x in shared memory at batch 9 to 32
// (staged_x; ring_batch.py splits K so that it fits).
//
// A task's k-range is cut into pages of whole k-tiles (a multiple of 4 but the last), one ring slot each; page i
// of the block goes to slot i % slots. Every consumer warp reads every page: the k-tiles of class kt % 4 go to
// warp (kt % 4) % C, into its sum set (kt % 4) / C. At the task's end the warps pass their class sums through
// shared memory and store v = (s0 + s2) + (s1 + s3): bf16 rows where K is whole, or the k-range's fp32 partial;
// once every range's partial of the panel is stored, each split task adds its slice of them in order
// (finish_layer): the same bits whatever the ring, the grid, the number of consumers, the block that sums or the
// other batch rows. (The first version
// gave each warp its own 16-row tasks: one warp's serial walk over K with half the warps idle on the down
// projection, 57% of copy at batch 8, see docs/performance.md.)
//
//   producer warp   walks the block's tasks and their pages and copies each page into its slot with one bulk
//                   copy (TMA) once every consumer has read the slot's previous page; it never waits on an
//                   activation.
//   consumer warps  walk the same tasks: on a task of a new layer, finish the layer before (finish_layer: every
//                   thread's stores fenced, a barrier; split tasks counted on their panels' tickets, a wait for
//                   their panels' other splits, their slices summed; one release of the block's tasks) and wait
//                   until the layer before has all its tasks counted (acquire); on a new k-range (staged x),
//                   queue its x's copies, a cp.async group a page; per page, load the page's first B fragments
//                   (before the slot's wait: x is ready) or wait for the page's x group, wait for the slot,
//                   multiply their k-tiles, give the slot back; at the task's end exchange the sums (one barrier,
//                   double-buffered) and store.
// Waits are exact by construction: a warp waits on page i's copy after reading page i - slots, and the
// producer on page i - slots's reads after copying it, so a phase parity never names a phase two away.
// Deadlock: every wait is on an earlier page of the block, on the layer before, which is earlier in every block,
// or on this layer's other splits, which wait only on the layer before; all blocks are resident (one per SM,
// checked at launch).
// tests/test_ring_batch.py simulates the protocol.

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ring_sync.cuh"

namespace {

using namespace ring;

constexpr int kMaxConsumers = 4;  // consumer warps of a block: 1, 2 or 4 (each owns 4 / C k-tile classes)
constexpr int kTileBytes = 512;   // one packed 16 x 16 k-tile of one m-tile: 32 lanes x 16 bytes
constexpr int kClasses = 4;       // k-tile classes kt % 4, each summed on its own
// prof's stamps of a page: the producer issued its copy; warp 0 took it up, had x (the layer before complete:
// later pages of a task stamp the same as taken), had the slot's bytes, had multiplied (and stored)
constexpr int kStamps = 5;
// Watchdog: a wait that has not passed after kPatienceNs gives up. The first to give up writes diag[0..7] =
// {what (1 producer's empty wait, 2 consumer's counter wait, 3 consumer's full wait, 4 a split's wait for its
// panel's other splits), block, warp, page (the block's), slot, layer or ticket, use or count, target (parity,
// task count or splits), pages of the block} and every
// warp that gives up returns: a hang becomes an error ring_batch.py names (check). Its barrier waits then
// give up too (the block's other warps are gone), so a block that gave up ends. ring_batch.py builds a longer
// patience (CQIL_RING_PATIENCE_S) for runs under compute-sanitizer, which are many times slower.
#ifndef RING_PATIENCE_NS
#define RING_PATIENCE_NS 2000000000LL
#endif
constexpr long long kPatienceNs = RING_PATIENCE_NS;

struct Task {                    // 72 bytes, written by ring_batch.py as 9 int64
  const unsigned char* w;        // the task's packed weights: its k-range's k_tiles k-tiles of MT fragments
  const __nv_bfloat16* x;        // act_l[0][16 k0]: the k-range's first column
  __nv_bfloat16* out;            // act_{l+1}[0][16 * MT * panel]
  float* partials;               // splits > 1: the panel's fp32 partial sums [splits][8 NT][16 MT]
  int layer;
  int wait_target;               // tasks of layer - 1 (0: layer 0, whose input is the chain's)
  int k_tiles;                   // the k-range's k-tiles
  int x_stride;                  // elements between batch rows of act_l
  int out_stride;                // and of act_{l+1}
  int pages;                     // ceil(k_tiles / tiles_per_page)
  int split;                     // the k-range's index of the layer's splits
  int splits;
  int ticket;                    // splits > 1: the panel's count of splits stored (an index into counters)
  int unused;
};
static_assert(sizeof(Task) == 72, "Task is 9 int64 on the Python side");

struct Args {                    // the kernel's parameters (ring_batch_launch's)
  const Task* tasks;             // every block's task list, block b's from task_off[b] to task_off[b + 1]
  const int* task_off;
  const int* page_off;           // block b's first page in prof (pages of the blocks before it)
  unsigned* counters;            // per layer, its tasks complete; then the split panels' tickets
  long long* prof;               // optional: per page, kStamps globaltimer ns
  long long* diag;               // [8], zero: the watchdog's report (kPatienceNs)
  int batch;
  int slot_bytes;
  int slots;
  int tiles_per_page;
  int x_tiles;                   // staged x: k-tiles of the longest k-range, rounded up to a multiple of 4
  int mode;
};

// d += a (16 x 16, the packed fragment) * b (16 x 8); fp32 sums.
__device__ __forceinline__ void mma16816(float (&d)[4], uint4 a, uint2 b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b.x), "r"(b.y));
}

// The consumer warps' barrier (the producer warp is not in it), with the watchdog's deadline: bar.sync cannot
// give up, so a warp that gave up elsewhere would hang the others in it. Instead an mbarrier counting every
// consumer lane: each arrives (releasing its own shared-memory writes) and waits for the phase of this
// generation (acquiring everyone's). Exact: a warp arrives for generation k + 1 only after generation k's phase
// completed, which needed every lane. (A shared count polled by lane 0 ordered the other lanes through
// __syncwarp, which racecheck does not follow: it reported the sums' exchange as hazards.)
__device__ __forceinline__ bool consumers_sync(std::uint64_t* bar, unsigned& generation, long long deadline) {
  mbar_arrive(bar);
  const bool ok = mbar_wait_until(bar, generation++ & 1, deadline);
  return __all_sync(0xffffffffu, ok);
}

__device__ void give_up(long long* diag, int what, int warp, int page, long long where, long long have,
                        long long want, int pages) {
  if (atomicCAS(reinterpret_cast<unsigned long long*>(diag), 0ull, static_cast<unsigned long long>(what)) == 0) {
    diag[1] = blockIdx.x;
    diag[2] = warp;
    diag[3] = page;
    diag[4] = where;
    diag[5] = have;
    diag[6] = want;
    diag[7] = pages;
    __threadfence();
  }
}

// k-tiles of one warp per chunk of a page: the B fragments of a chunk (chunk x NT uint2, 16 to 32 registers)
// are loaded before its products, the next chunk's while this one multiplies. A multiple of 4, so that the
// warp's j-th tile of a chunk is in its sum set j % S whatever the chunk.
template <int NT>
__host__ __device__ constexpr int chunk() { return NT == 1 ? 16 : NT == 2 ? 8 : 4; }

// The warp's j-th tile of a page is local tile 4 * (j / S) + w + C * (j % S), S = 4 / C its classes: warp w
// takes the classes w, w + C, ... (a page starts at a multiple of 4 k-tiles, so local and global classes agree).
template <int C>
__device__ __forceinline__ int tile_of(int j, int w) {
  constexpr int S = kClasses / C;
  return 4 * (j / S) + w + C * (j % S);
}

// k-tiles in page p of a task of k_tiles (pages of T; the last may be short).
__device__ __forceinline__ int page_tiles(int p, int T, int k_tiles) { return min(T, k_tiles - p * T); }

// A warp's tiles of a page of `tiles` k-tiles: j = 0 .. warp_tiles - 1 (tile_of(j) may pass `tiles` in the
// last group of 4). The products and stage_x walk the same j.
template <int C>
__device__ __forceinline__ int warp_tiles(int tiles) { return kClasses / C * ((tiles + 3) / 4); }

// One k-tile's products into one sum set: its MT A fragments (local k-tile u of the slot at wp) times the NT B
// fragments b.
template <int NT, int MT>
__device__ __forceinline__ void tile_products(float (&acc)[MT][NT][4], const uint4* wp, int u, int lane,
                                              const uint2 (&b)[NT]) {
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const uint4 av = wp[(u * MT + m) * 32 + lane];
#pragma unroll
    for (int q = 0; q < NT; ++q) mma16816(acc[m][q], av, b[q]);
  }
}

template <int NT, int C>
__device__ __forceinline__ void load_b(uint2 (&b)[chunk<NT>()][NT], const __nv_bfloat16* x, int x_stride,
                                       int first, int tiles, int w, int batch, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < chunk<NT>(); ++i) {
    const int u = tile_of<C>(first + i, w);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      b[i][j] = make_uint2(0u, 0u);
      if (g + 8 * j < batch && u < tiles)
        b[i][j] = __ldcg(reinterpret_cast<const uint2*>(x + static_cast<long long>(g + 8 * j) * x_stride +
                                                        16 * u + 4 * t));
    }
  }
}

// Batches of 9 to 32 rows (NT >= 2) keep x resident in shared memory: each consumer warp copies its own k-tiles of
// the task's k-range of x (cp.async, 16 bytes a lane, L2 only; one group per page) into its buffer [tile j of the
// warp's k-range][8 NT rows][16 bf16] (rows past the batch zero-filled), once per k-range: the block's next task of
// the same layer and k-range (its tasks of a layer are consecutive panels of one or two k-ranges, plan) reads x from
// there again. Its B fragments are 8-byte shared-memory reads: lane (g, t) of n-tile q reads row g + 8q at byte 8t,
// eight rows of 32 contiguous bytes, no bank conflict. (0feb029 staged each page's x a page ahead, as many bytes
// of x from L2 as of weights at 32-row tasks; splitting K so that a block's k-range of x fits shared memory reads
// x once per k-range instead.)
template <int NT>
__host__ __device__ constexpr bool staged_x() { return NT >= 2; }

// Bytes of one warp's x buffer for k-ranges of up to x_tiles k-tiles (a multiple of 4) with C consumers: its
// x_tiles / C tiles of 8 NT rows.
__host__ __device__ constexpr int x_buffer_bytes(int x_tiles, int consumers, int nt) {
  return x_tiles / consumers * 8 * nt * 32;
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// Wait until at most `pending` of the warp's most recent cp.async groups are in flight (a wait for more than 3
// waits for 3: longer than needed, never shorter).
__device__ __forceinline__ void cp_async_wait_pending(int pending) {
  if (pending >= 3) cp_async_wait<3>();
  else if (pending == 2) cp_async_wait<2>();
  else if (pending == 1) cp_async_wait<1>();
  else cp_async_wait<0>();
}

// Queue the copies of warp w's k-tiles of a page (tiles k-tiles from xp, x's rows x_stride apart) into dst as one
// cp.async group.
template <int NT, int C>
__device__ __forceinline__ void stage_x(unsigned char* dst, const __nv_bfloat16* xp, int x_stride, int tiles, int w,
                                        int batch, int lane) {
  constexpr int kRows = 8 * NT;
  const int mine = warp_tiles<C>(tiles);
  for (int c = lane; c < mine * kRows * 2; c += 32) {
    const int j = c / (2 * kRows), n = (c >> 1) % kRows, half = c & 1;
    const int u = tile_of<C>(j, w);
    const bool real = n < batch && u < tiles;
    cp_async16(dst + (j * kRows + n) * 32 + half * 16,
               real ? xp + static_cast<long long>(n) * x_stride + 16 * u + 8 * half : xp, real ? 16 : 0);
  }
  cp_async_commit();
}

// A split task's share of its panel's sum (finish_layer): its slice `split` of `splits` of the panel's [batch][16 MT]
// outputs, every split's partial of it read from L2 (loads of 8 splits in flight together) and added in split order,
// p0 + p1 + ...: the same bits whichever block sums a slice. Item i of `items` is float4 `i` of the slice; the
// caller spreads the items of its tasks over its threads.
template <int NT, int MT>
__device__ __forceinline__ void sum_slice(const Task& task, int batch, int i) {
  constexpr int kRowV = 4 * MT;            // float4s of one batch row of the panel (16 MT floats)
  constexpr int kSplitV = 8 * NT * kRowV;  // float4s of one split's partials
  const int n_v = batch * kRowV, splits = task.splits;
  const int f = task.split * n_v / splits + i;  // the slice's float4s: [split n_v / splits, (split + 1) n_v / splits)
  const float4* ws = reinterpret_cast<const float4*>(task.partials) + f;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int s0 = 0; s0 < splits; s0 += 8) {
    float4 v[8];
#pragma unroll
    for (int d = 0; d < 8; ++d)
      v[d] = s0 + d < splits ? __ldcg(ws + (s0 + d) * kSplitV) : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int d = 0; d < 8; ++d) {
      if (s0 + d == 0) {
        acc = v[d];
      } else if (s0 + d < splits) {
        acc.x += v[d].x;
        acc.y += v[d].y;
        acc.z += v[d].z;
        acc.w += v[d].w;
      }
    }
  }
  const int n = f / kRowV, row = 4 * (f % kRowV);
  const __nv_bfloat162 lo = __floats2bfloat162_rn(acc.x, acc.y), hi = __floats2bfloat162_rn(acc.z, acc.w);
  uint2 packed;
  packed.x = *reinterpret_cast<const unsigned*>(&lo);
  packed.y = *reinterpret_cast<const unsigned*>(&hi);
  *reinterpret_cast<uint2*>(task.out + static_cast<long long>(n) * task.out_stride + row) = packed;
}

// Float4s of split task's slice of its panel (sum_slice).
__device__ __forceinline__ int slice_items(const Task& task, int batch, int row_v) {
  const int n_v = batch * row_v;
  return (task.split + 1) * n_v / task.splits - task.split * n_v / task.splits;
}

// The end of the block's tasks k_begin .. k_end - 1 of one layer, all stored (bf16 rows, or where the layer is
// split over K fp32 partials): where split, each task counts itself on its panel's ticket (a release of this
// block's partials), lanes of warp 0 32 tasks at a time, waits until every split of its panel has (acquire), and
// the block sums each task's slice of its panel (sum_slice): the sums' loads spread over every block of the layer
// instead of falling on the block that completes a panel. Then the block's tasks are published on the layer's
// counter (a layer is complete when all its tasks are: every slice of every panel summed). The wait is on other
// blocks' tasks of this layer, which wait only on the layer before: no deadlock.
template <int NT, int MT, int C>
__device__ bool finish_layer(const Args& a, int k_begin, int k_end, std::uint64_t* bar, unsigned& generation,
                             long long deadline, int warp, int lane, int page, int n_pages) {
  const Task* tasks = a.tasks;
  __threadfence();  // every thread's stores, before the barrier and the tickets' or the counter's release
  if (!consumers_sync(bar, generation, deadline)) return false;
  const int layer = tasks[k_begin].layer;
  if (tasks[k_begin].splits > 1) {  // a layer's tasks are all split or none
    if (warp == 0) {
      for (int k = k_begin + lane; k < k_end; k += 32) red_release(a.counters + tasks[k].ticket, 1u);
      for (int k0 = k_begin; k0 < k_end; k0 += 32) {
        const int k = k0 + lane;
        const unsigned want = k < k_end ? static_cast<unsigned>(tasks[k].splits) : 0u;
        const unsigned* ticket = a.counters + (k < k_end ? tasks[k].ticket : 0);
        while (true) {
          const unsigned seen = want ? load_acquire(ticket) : 0u;
          if (__all_sync(0xffffffffu, seen >= want)) break;
          if (__any_sync(0xffffffffu, global_ns() > deadline)) {
            if (seen < want) give_up(a.diag, 4, warp, page, tasks[k].ticket, seen, want, n_pages);
            return false;
          }
        }
      }
    }
    if (!consumers_sync(bar, generation, deadline)) return false;  // every split of the block's panels stored
    int item = warp * 32 + lane;
    for (int k = k_begin; k < k_end; ++k) {
      const int n = slice_items(tasks[k], a.batch, 4 * MT);
      for (; item < n; item += 32 * C) sum_slice<NT, MT>(tasks[k], a.batch, item);
      item -= n;
    }
    __threadfence();
    if (!consumers_sync(bar, generation, deadline)) return false;
  }
  if (warp == 0 && lane == 0) red_release(a.counters + layer, static_cast<unsigned>(k_end - k_begin));
  return true;
}

// mode: 0 the chain; 1 stream only (no products: zeros stored); 2 compute only (no copies: the producer
// arrives on the slot's barrier at once, the consumers multiply whatever the slot holds); 3 compute only
// without x (as 2, the B fragments zeros instead of L2 reads, or where x is staged no copies, the buffers'
// stale contents); 4 compute only without the layers' waits (as 2, a task not waiting for the layer before).
// Modes 1 to 3 keep every wait and counter, 4 every counter; their results are meaningless.
template <int NT, int MT, int C>
__global__ void __launch_bounds__((kMaxConsumers + 1) * 32, 1) ring_batch_kernel(const Args a) {
  constexpr int S = kClasses / C;         // sum sets (k-tile classes) of a warp
  constexpr int kRed = kClasses * MT * NT * 4 * 32;  // floats of one buffer of the class sums
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* ring = smem;
  float* red = reinterpret_cast<float*>(smem + a.slots * a.slot_bytes);  // [2][class][mt][j][e][lane]
  const int x_bytes = staged_x<NT>() ? x_buffer_bytes(a.x_tiles, C, NT) : 0;  // one consumer warp's buffer
  unsigned char* xbufs = reinterpret_cast<unsigned char*>(red + 2 * kRed);  // [consumer warp][x_bytes]
  std::uint64_t* full = reinterpret_cast<std::uint64_t*>(xbufs + C * x_bytes);
  std::uint64_t* empty = full + a.slots;
  std::uint64_t* consumers_bar = empty + a.slots;
  const int slots = a.slots;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    for (int s = 0; s < slots; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 32 * C);  // every lane of every consumer warp arrives (see the consumers' loop)
    }
    mbar_init(consumers_bar, 32 * C);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  const long long deadline = global_ns() + kPatienceNs;
  const int t0 = a.task_off[blockIdx.x], n_tasks = a.task_off[blockIdx.x + 1] - t0;
  const int p0 = a.page_off[blockIdx.x], n_pages = a.page_off[blockIdx.x + 1] - p0;
  const int page_bytes = a.tiles_per_page * MT * kTileBytes;
  if (warp == C) {  // producer
    if (lane != 0) return;
    int i = 0;
    for (int k = 0; k < n_tasks; ++k) {
      const Task& task = a.tasks[t0 + k];
      const unsigned char* w = task.w;
      const int pages = task.pages, k_tiles = task.k_tiles;
      for (int p = 0; p < pages; ++p, ++i) {
        const int s = i % slots, use = i / slots;
        if (use > 0 && !mbar_wait_until(&empty[s], (use - 1) & 1, deadline)) {
          give_up(a.diag, 1, warp, i, s, use, (use - 1) & 1, n_pages);
          return;
        }
        if (a.prof) a.prof[static_cast<long long>(p0 + i) * kStamps] = global_ns();
        if (a.mode >= 2) {
          mbar_arrive(&full[s]);
        } else {
          const int tiles = page_tiles(p, a.tiles_per_page, k_tiles);
          const unsigned bytes = static_cast<unsigned>(tiles * MT * kTileBytes);
          mbar_expect_tx(&full[s], bytes);
          bulk_copy(ring + s * a.slot_bytes, w + static_cast<long long>(p) * page_bytes, bytes, &full[s]);
        }
      }
    }
    return;
  }

  const int g = lane >> 2, t = lane & 3;
  float acc[S][MT][NT][4];
  unsigned generation = 0;
  int ready_layer = 0, buf = 0;
  int layer_begin = 0;  // the block's first task of the layer it is in
  int i = 0;            // the block's page
  // staged x: the warp's buffer and the k-range it holds (its layer, first column and k-tiles: a layer's input may
  // share memory with another's); a task that copies a new one waits for each page's cp.async group
  unsigned char* const xmine = xbufs + warp * x_bytes;
  const __nv_bfloat16* resident = nullptr;
  int resident_tiles = 0, resident_layer = -1;
  const bool stage = staged_x<NT>() && a.mode != 1 && a.mode != 3;
  const int page_x_bytes = a.tiles_per_page / C * 8 * NT * 32;  // a whole page's tiles in the warp's buffer
  for (int k = 0; k < n_tasks; ++k) {
    const Task& task = a.tasks[t0 + k];
    const int layer = task.layer, pages = task.pages, k_tiles = task.k_tiles, x_stride = task.x_stride;
    const __nv_bfloat16* x = task.x;
    long long* stamp = a.prof && warp == 0 && lane == 0 ? a.prof + static_cast<long long>(p0 + i) * kStamps
                                                        : nullptr;
    const long long taken = stamp ? global_ns() : 0;
    if (k > layer_begin && layer != a.tasks[t0 + k - 1].layer) {  // the layer it leaves, before any wait on this one
      if (!finish_layer<NT, MT, C>(a, t0 + layer_begin, t0 + k, consumers_bar, generation, deadline, warp, lane, i,
                                   n_pages))
        return;
      layer_begin = k;
    }
    if (task.wait_target > 0 && ready_layer < layer && a.mode != 4) {
      while (true) {  // every lane acquires (its own later loads of x are ordered after); the vote keeps the
        // warp together
        const unsigned seen = load_acquire(a.counters + layer - 1);
        if (__all_sync(0xffffffffu, seen >= static_cast<unsigned>(task.wait_target))) break;
        if (__any_sync(0xffffffffu, global_ns() > deadline)) {
          if (lane == 0) give_up(a.diag, 2, warp, i, layer, seen, task.wait_target, n_pages);
          return;
        }
      }
      ready_layer = layer;
    }
    const long long had_x = stamp ? global_ns() : 0;
    const bool fresh = stage && (x != resident || k_tiles != resident_tiles || layer != resident_layer);
    if (fresh) {  // a new k-range: its x into the warp's buffer, one cp.async group per page
      __syncwarp();  // every lane is done with the k-range before
      for (int p = 0; p < pages; ++p)
        stage_x<NT, C>(xmine + p * page_x_bytes, x + 16 * p * a.tiles_per_page, x_stride,
                       page_tiles(p, a.tiles_per_page, k_tiles), warp, a.batch, lane);
      resident = x;
      resident_tiles = k_tiles;
      resident_layer = layer;
    }
#pragma unroll
    for (int h = 0; h < S; ++h)
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int q = 0; q < NT; ++q) acc[h][m][q][0] = acc[h][m][q][1] = acc[h][m][q][2] = acc[h][m][q][3] = 0.f;
    for (int p = 0; p < pages; ++p, ++i) {
      if (warp == 0 && lane == 0 && a.prof) {
        stamp = a.prof + static_cast<long long>(p0 + i) * kStamps;
        stamp[1] = p ? global_ns() : taken;
        stamp[2] = p ? stamp[1] : had_x;
      }
      const int s = i % slots, tiles = page_tiles(p, a.tiles_per_page, k_tiles);
      const __nv_bfloat16* xp = x + 16 * p * a.tiles_per_page;
      const int mine = warp_tiles<C>(tiles);
      // The first chunk's B fragments before the slot's wait (x is ready), the next chunk's while one multiplies.
      // (b917ec4 loaded them a chunk ahead across pages too: slower at every batch, 73.7% of copy against this
      // loop's 85.0% at batch 1, same run, record ring_batch_h100_4ba8327.)
      uint2 b[2][chunk<NT>()][NT];
      const int x_rows = a.mode == 3 ? 0 : a.batch;  // no row of x read: B fragments of zeros
      if (fresh) {
        cp_async_wait_pending(pages - 1 - p);  // this page's group (and those before) in place
        __syncwarp();                          // for every lane
      } else if (!staged_x<NT>() && a.mode != 1) {
        load_b<NT, C>(b[0], xp, x_stride, 0, tiles, warp, x_rows, lane);
      }
      if (!__all_sync(0xffffffffu, mbar_wait_until(&full[s], (i / slots) & 1, deadline))) {
        if (lane == 0) give_up(a.diag, 3, warp, i, s, i / slots, (i / slots) & 1, n_pages);
        return;
      }
      if (stamp) stamp[3] = global_ns();
      if (staged_x<NT>() && a.mode != 1) {
        const uint4* wp = reinterpret_cast<const uint4*>(ring + s * a.slot_bytes);
        const unsigned char* xr = xmine + p * page_x_bytes + (g * 32 + 8 * t);
        for (int j0 = 0; j0 < mine; j0 += 4) {  // groups of 4: the j-th tile's sum set j % S is known here
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int j = j0 + r, u = tile_of<C>(j, warp);
            if (j < mine && u < tiles) {
              uint2 bq[NT];
#pragma unroll
              for (int q = 0; q < NT; ++q)
                bq[q] = *reinterpret_cast<const uint2*>(xr + (j * 8 * NT + 8 * q) * 32);
              tile_products<NT, MT>(acc[r % S], wp, u, lane, bq);
            }
          }
        }
      } else if (a.mode != 1) {
        const uint4* wp = reinterpret_cast<const uint4*>(ring + s * a.slot_bytes);
        for (int c = 0; c < mine; c += 2 * chunk<NT>()) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int first = c + half * chunk<NT>();
            if (first >= mine) break;
            if (first + chunk<NT>() < mine)
              load_b<NT, C>(b[half ^ 1], xp, x_stride, first + chunk<NT>(), tiles, warp, x_rows, lane);
#pragma unroll
            for (int jj = 0; jj < chunk<NT>(); ++jj) {
              const int u = tile_of<C>(first + jj, warp);
              if (u < tiles) tile_products<NT, MT>(acc[jj % S], wp, u, lane, b[half][jj]);
            }
          }
        }
      }
      // Every lane arrives: an arrival releases its own thread's reads of the slot, and the producer's next bulk
      // copy into it must come after all 32 lanes' reads. (Lane 0 alone after __syncwarp was reported by
      // racecheck as a WAR hazard on every other lane's reads.)
      mbar_arrive(&empty[s]);
      if (stamp) stamp[4] = global_ns();
    }
    // the class sums through shared memory; v = (s0 + s2) + (s1 + s3), each warp storing its (m, j) pairs: bf16
    // rows, or where the layer is split over K the fp32 partial of this k-range (summed in finish_layer)
    float* r = red + buf * kRed;
#pragma unroll
    for (int h = 0; h < S; ++h)
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int q = 0; q < NT; ++q)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            r[((((warp + C * h) * MT + m) * NT + q) * 4 + e) * 32 + lane] = acc[h][m][q][e];
    if (!consumers_sync(consumers_bar, generation, deadline)) return;
    float* partial = task.splits > 1 ? task.partials + task.split * (8 * NT * 16 * MT) : nullptr;
    for (int pair = warp; pair < MT * NT; pair += C) {
      const int m = pair / NT, q = pair % NT;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int n = 8 * q + 2 * t + (e & 1), row = 16 * m + g + 8 * (e >> 1);
        float v[kClasses];
#pragma unroll
        for (int cl = 0; cl < kClasses; ++cl) v[cl] = r[(((cl * MT + m) * NT + q) * 4 + e) * 32 + lane];
        if (n >= a.batch) continue;
        const float sum = (v[0] + v[2]) + (v[1] + v[3]);
        if (partial)
          partial[n * 16 * MT + row] = sum;
        else
          task.out[static_cast<long long>(n) * task.out_stride + row] = __float2bfloat16(sum);
      }
    }
    if (stamp) stamp[4] = global_ns();
    buf ^= 1;
  }
  if (n_tasks)
    finish_layer<NT, MT, C>(a, t0 + layer_begin, t0 + n_tasks, consumers_bar, generation, deadline, warp, lane, i,
                            n_pages);
}

template <int NT, int MT, int C>
cudaError_t launch(const Args& a, int grid, int smem, cudaStream_t st) {
  cudaError_t err =
      cudaFuncSetAttribute(ring_batch_kernel<NT, MT, C>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  // The blocks wait on one another: all must be resident at once, or the chain deadlocks (the watchdog would
  // give up). Refused here if the SMs cannot hold the grid with this kernel's registers and shared memory.
  int device = 0, sms = 0, fit = 0;
  if ((err = cudaGetDevice(&device)) != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess) return err;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fit, ring_batch_kernel<NT, MT, C>, (C + 1) * 32, smem);
  if (err != cudaSuccess) return err;
  if (grid > fit * sms) return cudaErrorCooperativeLaunchTooLarge;
  ring_batch_kernel<NT, MT, C><<<grid, (C + 1) * 32, smem, st>>>(a);
  return cudaGetLastError();
}

template <int MT, int C>
cudaError_t launch_nt(const Args& a, int grid, int smem, cudaStream_t st) {
  switch ((a.batch + 7) / 8) {
    case 1: return launch<1, MT, C>(a, grid, smem, st);
    case 2: return launch<2, MT, C>(a, grid, smem, st);
    case 3: return launch<3, MT, C>(a, grid, smem, st);
    default: return launch<4, MT, C>(a, grid, smem, st);
  }
}

template <int MT>
cudaError_t launch_c(const Args& a, int consumers, int grid, int smem, cudaStream_t st) {
  if constexpr (MT == 4) {  // one warp's four class sums of four m-tiles would not fit its registers
    return consumers == 2 ? launch_nt<MT, 2>(a, grid, smem, st) : launch_nt<MT, 4>(a, grid, smem, st);
  } else {
    switch (consumers) {
      case 1: return launch_nt<MT, 1>(a, grid, smem, st);
      case 2: return launch_nt<MT, 2>(a, grid, smem, st);
      default: return launch_nt<MT, 4>(a, grid, smem, st);
    }
  }
}

}  // namespace

extern "C" const char* ring_batch_error(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

// The shared memory a launch needs: the ring, two buffers of the class sums, from batch 9 each consumer warp's x
// buffer (k-ranges of up to x_tiles k-tiles), the barriers, the consumers' barrier (an mbarrier) and finish_layer's
// two mask words.
extern "C" int ring_batch_smem(int slots, int slot_bytes, int batch, int m_tiles, int consumers, int x_tiles) {
  const int nt = (batch + 7) / 8;
  const int x = nt >= 2 ? consumers * x_buffer_bytes(x_tiles, consumers, nt) : 0;
  return slots * slot_bytes + 2 * kClasses * m_tiles * nt * 4 * 32 * 4 + x + 2 * slots * 8 + 16;
}

// Zeroes the counters (n_counters: the layers' and the split panels' tickets) and launches the chain on `stream`
// (capturable). x_tiles: k-tiles of the longest k-range, a multiple of 4 (sizes the x buffers from batch 9 on).
// Returns a cudaError_t.
extern "C" int ring_batch_launch(const void* tasks, const int* task_off, const int* page_off, unsigned* counters,
                                 long long* prof, long long* diag, int n_counters, int batch, int m_tiles,
                                 int tiles_per_page, int slots, int consumers, int grid, int mode, int x_tiles,
                                 void* stream) {
  if ((consumers != 1 && consumers != 2 && consumers != 4) || slots < 1 || batch < 1 || batch > 32 ||
      (m_tiles != 1 && m_tiles != 2 && m_tiles != 4) || (m_tiles == 4 && consumers == 1) || tiles_per_page < 4 ||
      tiles_per_page % 4 || mode < 0 || mode > 4 || x_tiles < 4 || x_tiles % 4 || n_counters < 1)
    return cudaErrorInvalidValue;
  const auto st = static_cast<cudaStream_t>(stream);
  const int slot_bytes = tiles_per_page * m_tiles * kTileBytes;
  const int smem = ring_batch_smem(slots, slot_bytes, batch, m_tiles, consumers, x_tiles);
  cudaError_t err = cudaMemsetAsync(counters, 0, sizeof(unsigned) * n_counters, st);
  if (err != cudaSuccess) return err;
  const Args a{static_cast<const Task*>(tasks), task_off, page_off, counters, prof, diag, batch, slot_bytes, slots,
               tiles_per_page, x_tiles, mode};
  switch (m_tiles) {
    case 1: return launch_c<1>(a, consumers, grid, smem, st);
    case 2: return launch_c<2>(a, consumers, grid, smem, st);
    default: return launch_c<4>(a, consumers, grid, smem, st);
  }
}
