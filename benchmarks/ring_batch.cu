// Prototype for the persistent decode step (issue 26), fourth stage: ring_chain.cu's weight ring for batches of
// 1 to 32 rows, the products on the tensor cores (mma.sync m16n8k16, bf16 in, fp32 sums). Built and loaded by
// benchmarks/ring_batch.py (nvcc, then ctypes, through ring_chain.py's builder); not part of the package.
//
// out_l[b] = W_l @ act_l[b] for every batch row b, layer after layer. A task is MT m-tiles of a layer (16 * MT
// rows of W) over all of K, and the whole block works on it: its weights are stored packed (ring_batch.py's
// pack) as [N / (16 MT), K / 16, MT, 32 lanes, 8 bf16], lane (g, t) = (lane / 4, lane % 4) of k-tile kt and
// m-tile mt holding the mma's A fragment a0..a3 =
//     W[g][4t, 4t+1], W[g + 8][4t, 4t+1], W[g][4t+2, 4t+3], W[g + 8][4t+2, 4t+3]      (k offsets within kt)
// so one 16-byte shared-memory read per lane, k-tile and m-tile is a whole fragment, with no bank conflict. The
// mma's k order within a tile is permuted alike in A and B (a0/b0 take k 4t, 4t+1; a2/b1 take 4t+2, 4t+3), so
// B's fragment for batch row n = g + 8j is the 8 contiguous bytes act[n][16kt + 4t .. 16kt + 4t + 3]: read
// from L2 at batch 1 to 8, from a copy of the page's x in shared memory at batch 9 to 32 (staged_x).
//
// A task's K is cut into pages of whole k-tiles (a multiple of 4 but the last), one ring slot each; page i of
// the block goes to slot i % slots. Every consumer warp reads every page: the k-tiles of class kt % 4 go to
// warp (kt % 4) % C, into its sum set (kt % 4) / C. At the task's end the warps pass their class sums through
// shared memory and store out = (s0 + s2) + (s1 + s3): the same bits whatever the ring, the grid, the number
// of consumers or the other batch rows. (The first version gave each warp its own 16-row tasks: one warp's
// serial walk over K with half the warps idle on the down projection, 57% of copy at batch 8, see
// docs/performance.md.)
//
//   producer warp   walks the block's tasks and their pages and copies each page into its slot with one bulk
//                   copy (TMA) once every consumer has read the slot's previous page; it never waits on an
//                   activation.
//   consumer warps  walk the same tasks: on a task of a new layer, count the block's tasks of the layer before
//                   (every thread's stores fenced, a barrier, one release) and wait until the layer before has
//                   all its tasks counted (acquire); per page, load the page's first B fragments (before the
//                   slot's wait: x is ready; staged x: queue the copy of the next page's x, the next task's
//                   first page where it is of the same layer, and wait for this page's), wait for the slot,
//                   multiply their k-tiles, give the slot back; at the task's end exchange the sums (one
//                   barrier, double-buffered) and store.
// Waits are exact by construction: a warp waits on page i's copy after reading page i - slots, and the
// producer on page i - slots's reads after copying it, so a phase parity never names a phase two away.
// Deadlock: every wait is on an earlier page of the block or on the layer before, which is earlier in every
// block; all blocks are resident (one per SM, checked at launch). tests/test_ring_batch.py simulates the
// protocol.

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
// {what (1 producer's empty wait, 2 consumer's counter wait, 3 consumer's full wait), block, warp, page (the
// block's), slot or layer, use or counter value, target (parity or task count), pages of the block} and every
// warp that gives up returns: a hang becomes an error ring_batch.py names (check). Its barrier waits then
// give up too (the block's other warps are gone), so a block that gave up ends. ring_batch.py builds a longer
// patience (CQIL_RING_PATIENCE_S) for runs under compute-sanitizer, which are many times slower.
#ifndef RING_PATIENCE_NS
#define RING_PATIENCE_NS 2000000000LL
#endif
constexpr long long kPatienceNs = RING_PATIENCE_NS;

struct Task {                    // 48 bytes, written by ring_batch.py as 6 int64
  const unsigned char* w;        // the task's packed weights: K / 16 k-tiles of MT fragments
  const __nv_bfloat16* x;        // act_l[0][0]
  __nv_bfloat16* out;            // act_{l+1}[0][16 * MT * task]
  int layer;
  int wait_target;               // tasks of layer - 1 (0: layer 0, whose input is the chain's)
  int k_tiles;                   // K / 16
  int x_stride;                  // elements between batch rows of act_l
  int out_stride;                // and of act_{l+1}
  int pages;                     // ceil(k_tiles / tiles_per_page)
};
static_assert(sizeof(Task) == 48, "Task is 6 int64 on the Python side");

struct Args {                    // the kernel's parameters (ring_batch_launch's)
  const Task* tasks;             // every block's task list, block b's from task_off[b] to task_off[b + 1]
  const int* task_off;
  const int* page_off;           // block b's first page in prof (pages of the blocks before it)
  unsigned* counters;            // per layer, its tasks stored
  long long* prof;               // optional: per page, kStamps globaltimer ns
  long long* diag;               // [8], zero: the watchdog's report (kPatienceNs)
  int batch;
  int slot_bytes;
  int slots;
  int tiles_per_page;
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

// Batches of 9 to 32 rows (NT >= 2) stage x through shared memory: each consumer warp copies its own k-tiles of
// the next page's x (cp.async, 16 bytes a lane, L2 only) while it multiplies this page's, into the other of its two
// buffers [tile j of the warp's page][8 NT rows][16 bf16] (rows past the batch zero-filled). Its B fragments are
// then 8-byte shared-memory reads: lane (g, t) of n-tile q reads row g + 8q at byte 8t, eight rows of 32
// contiguous bytes, no bank conflict. (The register path, one chunk of B fragments in flight per warp, left
// batch 32's compute-only diagnostic at ~50 us a layer; batches 1 to 8 keep it. Staging 3 or 4 pages deep was
// slower: its buffers shrink the ring, record ring_batch_xstages_h100_998cacf.)
template <int NT>
__host__ __device__ constexpr bool staged_x() { return NT >= 2; }

// Bytes of one warp's x buffer for pages of tpp k-tiles with C consumers: its tpp / C tiles of 8 NT rows.
__host__ __device__ constexpr int x_buffer_bytes(int tpp, int consumers, int nt) {
  return tpp / consumers * 8 * nt * 32;
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

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
  const int x_bytes = staged_x<NT>() ? x_buffer_bytes(a.tiles_per_page, C, NT) : 0;  // one consumer warp's buffer
  unsigned char* xbufs = reinterpret_cast<unsigned char*>(red + 2 * kRed);  // [consumer warp][2][x_bytes]
  std::uint64_t* full = reinterpret_cast<std::uint64_t*>(xbufs + 2 * C * x_bytes);
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
  int done_layer = 0, ready_layer = 0, buf = 0;
  unsigned done = 0;
  int i = 0;  // the block's page
  // staged x: the warp's two buffers, the one holding the current page's (xb), and whether the next task's first
  // page was staged already (during this task's last page, where its layer is ready)
  unsigned char* const xmine = xbufs + 2 * warp * x_bytes;
  int xb = 0;
  bool next_staged = false;
  const bool stage = staged_x<NT>() && a.mode != 1 && a.mode != 3;
  for (int k = 0; k < n_tasks; ++k) {
    const Task& task = a.tasks[t0 + k];
    const int layer = task.layer, pages = task.pages, k_tiles = task.k_tiles, x_stride = task.x_stride;
    const __nv_bfloat16* x = task.x;
    long long* stamp = a.prof && warp == 0 && lane == 0 ? a.prof + static_cast<long long>(p0 + i) * kStamps
                                                        : nullptr;
    const long long taken = stamp ? global_ns() : 0;
    if (done && layer != done_layer) {  // the block's tasks of the layer it leaves, before any wait on this one
      __threadfence();
      if (!consumers_sync(consumers_bar, generation, deadline)) return;
      if (warp == 0 && lane == 0) red_release(a.counters + done_layer, done);
      done = 0;
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
    if (stage && !next_staged) stage_x<NT, C>(xmine + xb * x_bytes, x, x_stride, page_tiles(0, a.tiles_per_page,
                                                                                       k_tiles), warp, a.batch, lane);
    next_staged = false;
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
      if (staged_x<NT>()) {
        if (stage) {
          __syncwarp();  // every lane is done with the other buffer (the page before's) before it is refilled
          bool more = true;
          if (p + 1 < pages) {
            stage_x<NT, C>(xmine + (xb ^ 1) * x_bytes, xp + 16 * a.tiles_per_page, x_stride,
                           page_tiles(p + 1, a.tiles_per_page, k_tiles), warp, a.batch, lane);
          } else if (k + 1 < n_tasks && a.tasks[t0 + k + 1].layer == layer) {  // ready: the same layer's input
            const Task& next = a.tasks[t0 + k + 1];
            stage_x<NT, C>(xmine + (xb ^ 1) * x_bytes, next.x, next.x_stride, page_tiles(0, a.tiles_per_page,
                           next.k_tiles), warp, a.batch, lane);
            next_staged = true;
          } else {
            more = false;
          }
          if (more) cp_async_wait<1>(); else cp_async_wait<0>();
          __syncwarp();  // every lane's copies of this page are in place
        }
      } else if (a.mode != 1) {
        load_b<NT, C>(b[0], xp, x_stride, 0, tiles, warp, x_rows, lane);
      }
      if (!__all_sync(0xffffffffu, mbar_wait_until(&full[s], (i / slots) & 1, deadline))) {
        if (lane == 0) give_up(a.diag, 3, warp, i, s, i / slots, (i / slots) & 1, n_pages);
        return;
      }
      if (stamp) stamp[3] = global_ns();
      if (staged_x<NT>() && a.mode != 1) {
        const uint4* wp = reinterpret_cast<const uint4*>(ring + s * a.slot_bytes);
        const unsigned char* xr = xmine + xb * x_bytes + (g * 32 + 8 * t);
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
      xb ^= 1;
      if (stamp) stamp[4] = global_ns();
    }
    // the class sums through shared memory; out = (s0 + s2) + (s1 + s3), each warp storing its (m, j) pairs
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
    for (int pair = warp; pair < MT * NT; pair += C) {
      const int m = pair / NT, q = pair % NT;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int n = 8 * q + 2 * t + (e & 1), row = 16 * m + g + 8 * (e >> 1);
        float v[kClasses];
#pragma unroll
        for (int cl = 0; cl < kClasses; ++cl) v[cl] = r[(((cl * MT + m) * NT + q) * 4 + e) * 32 + lane];
        if (n < a.batch)
          task.out[static_cast<long long>(n) * task.out_stride + row] =
              __float2bfloat16((v[0] + v[2]) + (v[1] + v[3]));
      }
    }
    if (stamp) stamp[4] = global_ns();
    buf ^= 1;
    done_layer = layer;
    ++done;
  }
  if (done) {
    __threadfence();
    if (!consumers_sync(consumers_bar, generation, deadline)) return;
    if (warp == 0 && lane == 0) red_release(a.counters + done_layer, done);
  }
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

// The shared memory a launch needs: the ring, two buffers of the class sums, from batch 9 each consumer warp's
// two x buffers, the barriers and the consumers' barrier (an mbarrier).
extern "C" int ring_batch_smem(int slots, int slot_bytes, int batch, int m_tiles, int consumers) {
  const int nt = (batch + 7) / 8, tpp = slot_bytes / (m_tiles * kTileBytes);
  const int x = nt >= 2 ? 2 * consumers * x_buffer_bytes(tpp, consumers, nt) : 0;
  return slots * slot_bytes + 2 * kClasses * m_tiles * nt * 4 * 32 * 4 + x + 2 * slots * 8 + 16;
}

// Zeroes the layers' counters and launches the chain on `stream` (capturable). Returns a cudaError_t.
extern "C" int ring_batch_launch(const void* tasks, const int* task_off, const int* page_off, unsigned* counters,
                                 long long* prof, long long* diag, int layers, int batch, int m_tiles,
                                 int tiles_per_page, int slots, int consumers, int grid, int mode, void* stream) {
  if ((consumers != 1 && consumers != 2 && consumers != 4) || slots < 1 || batch < 1 || batch > 32 ||
      (m_tiles != 1 && m_tiles != 2 && m_tiles != 4) || (m_tiles == 4 && consumers == 1) || tiles_per_page < 4 ||
      tiles_per_page % 4 || mode < 0 || mode > 4)
    return cudaErrorInvalidValue;
  const auto st = static_cast<cudaStream_t>(stream);
  const int slot_bytes = tiles_per_page * m_tiles * kTileBytes;
  const int smem = ring_batch_smem(slots, slot_bytes, batch, m_tiles, consumers);
  cudaError_t err = cudaMemsetAsync(counters, 0, sizeof(unsigned) * layers, st);
  if (err != cudaSuccess) return err;
  const Args a{static_cast<const Task*>(tasks), task_off, page_off, counters, prof, diag, batch, slot_bytes, slots,
               tiles_per_page, mode};
  switch (m_tiles) {
    case 1: return launch_c<1>(a, consumers, grid, smem, st);
    case 2: return launch_c<2>(a, consumers, grid, smem, st);
    default: return launch_c<4>(a, consumers, grid, smem, st);
  }
}
