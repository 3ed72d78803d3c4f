// Prototype for the persistent decode step (issue 26), fifth stage: whole LLaMA decode layers at batch 1 in one
// launch, on ring_chain.cu's weight ring. Built and loaded by benchmarks/ring_layer.py (nvcc, then ctypes, through
// ring_chain.py's builder); not part of the package.
//
// Each layer is five sub-layers, one after the other (sub-layer j = 5 l + kind), each with a counter of its tasks:
//   kQkv     rows of the layer's QKV weight (rows permuted so that a task holds whole RoPE pairs), x = RMSNorm(h):
//            bf16(x * norm weight) staged, the sums times 1/rms, rounded, rotated, stored to q or to the cache
//            at `pos` (v unrotated);
//   kAttn    one kv head's keys and values of a split of the cached positions, streamed through the ring like
//            weights (they were written by earlier steps), and the current position's from the cache (written
//            by this launch's kQkv): fp32 partials (unnormalized sums, running max, sum of weights) per query head,
//            merged by the kv head's last split to finish into the bf16 attention;
//   kO       rows of o_proj, x = the attention, + h: h_mid;
//   kGateUp  rows of gate and the same rows of up in one slot, x = RMSNorm(h_mid): silu(g) * u;
//   kDown    rows of the down projection, x = the activations, + h_mid: the next layer's h.
// A task waits only for tasks earlier in every block's order (the sub-layer before; with ring_layer.py's per_head
// plan, an attention task for its own kv head's QKV rows, each kv head's counted on a counter of their own), so
// ring_chain.cu's argument holds: no task waits on a later one, every block is resident, no order of scheduling
// deadlocks. The QKV weight's rows are ordered by kv head (its G query heads, its key, its value) either way.
//
//   producer warp   lane 0 walks the block's tasks and copies task i's page into slot i % slots with bulk copies
//                   (TMA) once the slot's previous page is read; it never waits on activations.
//   consumer warps  warp w takes the block's tasks w, w + C, ...; counts its tasks of a sub-layer once it moves on
//                   to another (every lane fenced, one release); waits for the sub-layer's input (the block's
//                   first task of a sub-layer stages x into buffer sub & 1 and tags it; kAttn tasks wait for the
//                   counter themselves), then for its page's bytes, computes, gives the slot back.
// Every task is one page (an attention split is one page of keys and values), and slots is a multiple of C, so
// slot s only ever holds pages of warp s % C, in that warp's order: a parity wait names one page by construction.
// (With multi-page tasks a warp could wait on a slot two uses ahead and pass on the older phase; the protocol
// simulation in tests/test_ring_layer.py found it.)
// Two x buffers suffice: a warp stages sub-layer j + 2 only after all of j + 1 is counted, which needs every task
// of j done reading buffer j & 1 (kAttn stages nothing; with per-head waits, all of attention counted still needs
// every kv head's QKV rows counted).
// Watchdog: every wait gives up RING_PATIENCE_NS after the launch; the first to give up writes diag[0..7] = {what
// (1 producer's empty, 2 counter, 3 tag, 4 full), block, warp, task, counter, sub-layer or slot, value seen,
// target, the block's tasks} and returns; ring_layer.py's check raises with it.

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ring_gemv.cuh"
#include "ring_sync.cuh"

#ifndef RING_PATIENCE_NS
#define RING_PATIENCE_NS 2000000000LL
#endif

namespace {

using namespace ring;

constexpr int kMaxConsumers = 8;
constexpr int kGroups[] = {1, 2, 3, 4};  // query heads per kv head an attention task takes (attn_task)
constexpr int kMaxLaneDims = 4;    // head_dim <= 128: dims d = lane + 32 j, j < head_dim / 32
constexpr int kMaxSplits = 64;     // attention splits of a kv head (ring_layer.py's MAX_SPLITS)
constexpr int kMergeLoads = 4;     // splits' sums a lane loads at once in the merge
constexpr int kStamps = 5;         // prof per task: page issued, taken, x ready, page's bytes there, stored

enum Kind : int { kQkv = 0, kAttn = 1, kO = 2, kGateUp = 3, kDown = 4 };

struct Task {       // 12 int32, written by ring_layer.py (its TASK_FIELDS, in this order)
  int kind, layer;
  int row0, rows;   // GEMV: first row and rows; kAttn: first cached position and cached positions of the split
  int page0;        // the block's index of the task's page (its index in the block's list: one page a task)
  int count_on;     // the counter this task adds to once stored (its sub-layer's, or its kv head's QKV rows')
  int wait_target;  // what counter wait_on must reach first (0: no wait)
  int first;        // 1: the block's first task of its sub-layer (stages x; kAttn: unused)
  int head, split;  // kAttn: kv head and split
  int current;      // kAttn: 1 for the split that adds the current position (the last)
  int wait_on;      // the counter kAttn tasks and a block's first task of a sub-layer wait on
};
static_assert(sizeof(Task) == 48, "Task is 12 int32 on the Python side");

struct Layer {      // per layer, 16 pointers written by ring_layer.py (its LAYER_FIELDS, in this order)
  const __nv_bfloat16* norm_in;    // [D]
  const __nv_bfloat16* wqkv;       // [(H + 2 Hkv) Dh, D] by kv head (its G query heads, k, v), each head's rows
                                   // as RoPE pairs (i, i + Dh / 2)
  const __nv_bfloat16* wo;         // [D, H Dh]
  const __nv_bfloat16* norm_post;  // [D]
  const __nv_bfloat16* wgu;        // [F / R, 2, R, D]: R gate rows, then the same R rows of up
  const __nv_bfloat16* wd;         // [D, F]
  __nv_bfloat16* k;                // the layer's cache [Hkv, S, Dh]
  __nv_bfloat16* v;
  const __nv_bfloat16* h;          // [D] the layer's input
  __nv_bfloat16* q;                // [H Dh], rotated
  float* part;                     // [H, splits, Dh + 2]: unnormalized sums, running max (log2 units), weight sum
  __nv_bfloat16* attn;             // [H Dh] the merged attention (o_proj's input)
  __nv_bfloat16* hmid;             // [D]
  __nv_bfloat16* act;              // [F]
  __nv_bfloat16* h_out;            // [D] the next layer's input
  const void* pad;
};
static_assert(sizeof(Layer) == 128, "Layer is 16 pointers on the Python side");

struct Params {
  const Task* tasks;
  const int* task_off;   // [grid + 1]: block b runs tasks[task_off[b] .. task_off[b + 1])
  const Layer* layers;
  unsigned* counters;    // tasks counted: per sub-layer [5 L], per layer and kv head's QKV rows [L Hkv]; zero at launch
  unsigned* tickets;     // [L Hkv] attention splits finished per kv head, zero at launch (in the same array)
  const float* inv_freq; // [Dh / 2]
  long long* prof;       // [tasks, kStamps] or null
  long long* diag;       // [8], zero at launch
  int D, H, Hkv, Dh, F, S, pos, splits;
  int slot_bytes, slots, x_bytes, page_positions;
  int mode;              // 0 the layers; diagnostics (every wait kept, results meaningless): 1 stream only (no
                         // products), 2 compute only (no page copied: the products of whatever the slots hold)
  float eps, scale;      // scale: log2(e) / sqrt(Dh)
};

__device__ __forceinline__ float bf(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float round_bf(float v) { return __bfloat162float(__float2bfloat16(v)); }
__device__ __forceinline__ __nv_bfloat16 ldcg(const __nv_bfloat16* p) {  // written by other blocks: through L2
  return __ushort_as_bfloat16(__ldcg(reinterpret_cast<const unsigned short*>(p)));
}

// s[r] = w[r] . x for the R rows of a slot, in every lane: each lane sums its 16-byte chunks lane, lane + 32, ...
// of K in order in fp32, even and odd elements apart, then a butterfly over the warp.
template <int R>
__device__ __forceinline__ void rows_dot(const uint4* w, const uint4* xs, int chunks, int lane, float (&s)[R]) {
  float even[R], odd[R];
#pragma unroll
  for (int r = 0; r < R; ++r) even[r] = odd[r] = 0.f;
  for (int c = lane; c < chunks; c += 32) {
    const uint4 xv = xs[c];
    const float xf[8] = {lo(xv.x), hi(xv.x), lo(xv.y), hi(xv.y), lo(xv.z), hi(xv.z), lo(xv.w), hi(xv.w)};
#pragma unroll
    for (int r = 0; r < R; ++r) dot8(w[r * chunks + c], xf, even[r], odd[r]);
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float v = even[r] + odd[r];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    s[r] = v;
  }
}

__device__ __forceinline__ unsigned mul2(unsigned x, unsigned w) {  // two bf16 products, each rounded once
  const __nv_bfloat162 r = __floats2bfloat162_rn(lo(x) * lo(w), hi(x) * hi(w));
  return *reinterpret_cast<const unsigned*>(&r);
}

// RMSNorm's operand: dst = bf16(x * w) (x [K] from global through L2, w the norm weight), 16 bytes a lane at a
// time, and 1/rms(x) returned to every lane (fp32 sum of squares, as the product's GEMM prologue computes it).
// (__restrict__: the norm weight's loads may go ahead of the stores to dst; nvcc 13, sm_90a: no spills, where
// loading the weight beside x in the first pass spilled 40 to 400 bytes at the kernel's 168 registers)
__device__ float stage_norm(uint4* __restrict__ dst, const __nv_bfloat16* __restrict__ x,
                            const __nv_bfloat16* __restrict__ w, int K, float eps, int lane) {
  float sq = stage_x<true>(dst, x, K, lane);
  const int chunks = K / 8;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
  const uint4* wv = reinterpret_cast<const uint4*>(w);
#pragma unroll 4
  for (int c = lane; c < chunks; c += 32) {  // the lane's own chunks: no other lane's writes to wait for
    const uint4 xv = dst[c], nv = __ldg(wv + c);
    dst[c] = make_uint4(mul2(xv.x, nv.x), mul2(xv.y, nv.y), mul2(xv.z, nv.z), mul2(xv.w, nv.w));
  }
  return rsqrtf(sq / K + eps);
}

// One kv head's attention over the split's cached positions (pages of the ring: keys at the slot's start, values
// page_positions rows on) and, for the last split, the current position: per query head g of the group, fp32
// running max m (log2 units), weight sum l and unnormalized sums acc; q pre-scaled by log2(e) / sqrt(Dh).
template <int G>
struct AttnState {
  float q[G][kMaxLaneDims], acc[G][kMaxLaneDims], m[G], l[G];
};

template <int G>
__device__ __forceinline__ void attend(AttnState<G>& st, const __nv_bfloat16* k, const __nv_bfloat16* v, int nd,
                                       int lane, bool global) {
  float kd[kMaxLaneDims], vd[kMaxLaneDims];
#pragma unroll
  for (int j = 0; j < kMaxLaneDims; ++j) {
    kd[j] = vd[j] = 0.f;
    if (j < nd) {
      kd[j] = global ? bf(ldcg(k + lane + 32 * j)) : bf(k[lane + 32 * j]);
      vd[j] = global ? bf(ldcg(v + lane + 32 * j)) : bf(v[lane + 32 * j]);
    }
  }
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < kMaxLaneDims; ++j) s = fmaf(st.q[g][j], kd[j], s);  // q is 0 past nd
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    const float m_new = fmaxf(st.m[g], s);
    const float c = exp2f(st.m[g] - m_new), e = exp2f(s - m_new);
    st.l[g] = st.l[g] * c + e;
#pragma unroll
    for (int j = 0; j < kMaxLaneDims; ++j) st.acc[g][j] = fmaf(e, vd[j], st.acc[g][j] * c);
    st.m[g] = m_new;
  }
}

// A kAttn task: its page of cached positions from the ring, then (the last split) the current position from the
// cache; the partials stored, and merged by the kv head's last split to finish. False if the watchdog gave up.
template <int G>
__device__ bool attn_task(const Task& t, const Params& p, const Layer& L, unsigned char* ring, std::uint64_t* full,
                          std::uint64_t* empty, long long deadline, long long* stamp, int warp, int task, int tasks,
                          int lane) {
  const int nd = p.Dh / 32;
  AttnState<G> st;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    st.m[g] = -INFINITY;
    st.l[g] = 0.f;
#pragma unroll
    for (int j = 0; j < kMaxLaneDims; ++j) {
      st.acc[g][j] = 0.f;
      st.q[g][j] = j < nd ? bf(ldcg(L.q + (t.head * G + g) * p.Dh + lane + 32 * j)) * p.scale : 0.f;
    }
  }
  const int page = t.page0, s = page % p.slots;
  if (!__all_sync(0xffffffffu, mbar_wait_until(&full[s], (page / p.slots) & 1, deadline))) {
    if (lane == 0) give_up(p.diag, 4, warp, task, s, page, (page / p.slots) & 1, tasks);
    return false;
  }
  if (stamp) stamp[3] = global_ns();
  const auto* ks = reinterpret_cast<const __nv_bfloat16*>(ring + s * p.slot_bytes);
  const auto* vs = ks + p.page_positions * p.Dh;
  for (int j = 0; j < (p.mode == 1 ? 0 : t.rows); ++j) attend<G>(st, ks + j * p.Dh, vs + j * p.Dh, nd, lane, false);
  __syncwarp();
  if (lane == 0) mbar_arrive(&empty[s]);
  if (t.current) {
    const long long at = (static_cast<long long>(t.head) * p.S + p.pos) * p.Dh;
    attend<G>(st, L.k + at, L.v + at, nd, lane, true);
  }
  const int stride = p.Dh + 2;
  float* part = L.part + static_cast<long long>(t.head) * G * p.splits * stride;  // [G, splits, Dh + 2]
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float* out = part + (g * p.splits + t.split) * stride;
#pragma unroll
    for (int j = 0; j < kMaxLaneDims; ++j)
      if (j < nd) out[lane + 32 * j] = st.acc[g][j];
    if (lane == 0) {
      out[p.Dh] = st.m[g];
      out[p.Dh + 1] = st.l[g];
    }
  }
  // The kv head's last split to finish merges them (a ticket, as the product's decode attention does): o = sum_s
  // 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s, the splits in order, bf16 into attn (o_proj's input).
  __threadfence();
  __syncwarp();
  unsigned arrived = 0;
  if (lane == 0) arrived = atomicAdd(p.tickets + t.layer * p.Hkv + t.head, 1u);
  if (__shfl_sync(0xffffffffu, arrived, 0) != static_cast<unsigned>(p.splits - 1)) return true;
  __threadfence();
  for (int g = 0; g < G; ++g) {
    const float* ph = part + g * p.splits * stride;
    // the splits' maxima and weight sums, split s in lane s % 32 (at most kMaxSplits): M and the denominator by
    // butterflies; then each lane's dims, kMergeLoads splits' sums in flight
    float m[kMaxSplits / 32], w[kMaxSplits / 32], M = -INFINITY, denom = 0.f;
#pragma unroll
    for (int k = 0; k < kMaxSplits / 32; ++k) {
      const int s = lane + 32 * k;
      m[k] = s < p.splits ? __ldcg(ph + s * stride + p.Dh) : -INFINITY;
      M = fmaxf(M, m[k]);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, off));
#pragma unroll
    for (int k = 0; k < kMaxSplits / 32; ++k) {
      const int s = lane + 32 * k;
      w[k] = exp2f(m[k] - M);  // 0 for an absent split or one of no position (m = -inf)
      if (s < p.splits) denom = fmaf(w[k], __ldcg(ph + s * stride + p.Dh + 1), denom);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) denom += __shfl_xor_sync(0xffffffffu, denom, off);
    float num[kMaxLaneDims] = {};
    for (int s0 = 0; s0 < p.splits; s0 += kMergeLoads) {
      float a[kMergeLoads][kMaxLaneDims];
#pragma unroll
      for (int u = 0; u < kMergeLoads; ++u)
#pragma unroll
        for (int j = 0; j < kMaxLaneDims; ++j)
          a[u][j] = s0 + u < p.splits && j < nd ? __ldcg(ph + (s0 + u) * stride + lane + 32 * j) : 0.f;
#pragma unroll
      for (int u = 0; u < kMergeLoads; ++u) {  // the splits in order
        const int s = s0 + u;
        float ws = 0.f;
#pragma unroll
        for (int k = 0; k < kMaxSplits / 32; ++k) {
          const float wk = __shfl_sync(0xffffffffu, w[k], s % 32);
          if (s / 32 == k) ws = wk;
        }
#pragma unroll
        for (int j = 0; j < kMaxLaneDims; ++j) num[j] = fmaf(ws, a[u][j], num[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < kMaxLaneDims; ++j)
      if (j < nd) L.attn[(t.head * G + g) * p.Dh + lane + 32 * j] = __float2bfloat16(num[j] / denom);
  }
  return true;
}

// The GEMV tasks' epilogues: the R sums s of rows row0.. (every lane holds them; lane r < R stores row r).
template <int R>
__device__ void gemv_task(const Task& t, const Params& p, const Layer& L, const uint4* w, const uint4* xs, float rstd,
                          int lane) {
  if (t.kind == kGateUp) {
    float s[2 * R];
    rows_dot<2 * R>(w, xs, p.mode == 1 ? 0 : p.D / 8, lane, s);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (lane == r) {
        const float g = s[r] * rstd, u = s[R + r] * rstd;
        L.act[t.row0 + r] = __float2bfloat16(g / (1.f + expf(-g)) * u);
      }
    }
    return;
  }
  const int K = t.kind == kQkv ? p.D : t.kind == kO ? p.H * p.Dh : p.F;
  float s[R];
  rows_dot<R>(w, xs, p.mode == 1 ? 0 : K / 8, lane, s);
  if (t.kind == kQkv) {  // pairs (2i, 2i + 1) of the permuted rows are dims (i, i + Dh / 2) of one head
#pragma unroll
    for (int r = 0; r < R; r += 2) {
      if (lane == r) {
        const int G = p.H / p.Hkv, row = t.row0 + r, i = (row % p.Dh) / 2, half = p.Dh / 2;
        const int kv = row / p.Dh / (G + 2), j = row / p.Dh % (G + 2);  // kv head; query head j < G, k, v
        float a = round_bf(s[r] * rstd), b = round_bf(s[r + 1] * rstd);
        if (j <= G) {  // q and k rotate; v does not
          float sn, cs;
          sincosf(static_cast<float>(p.pos) * p.inv_freq[i], &sn, &cs);
          const float ra = a * cs - b * sn, rb = b * cs + a * sn;
          a = ra;
          b = rb;
        }
        __nv_bfloat16* dst;
        if (j < G) {
          dst = L.q + (kv * G + j) * p.Dh;
        } else {
          dst = (j == G ? L.k : L.v) + (static_cast<long long>(kv) * p.S + p.pos) * p.Dh;
        }
        dst[i] = __float2bfloat16(a);
        dst[i + half] = __float2bfloat16(b);
      }
    }
    return;
  }
  const __nv_bfloat16* res = t.kind == kO ? L.h : L.hmid;
  __nv_bfloat16* out = t.kind == kO ? L.hmid : L.h_out;
#pragma unroll
  for (int r = 0; r < R; ++r)
    if (lane == r) out[t.row0 + r] = __float2bfloat16(bf(ldcg(res + t.row0 + r)) + s[r]);
}

__global__ void __launch_bounds__((kMaxConsumers + 1) * 32, 1) ring_layer_kernel(const Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* ring = smem;
  unsigned char* xbufs = smem + p.slots * p.slot_bytes;  // two buffers of x_bytes
  std::uint64_t* full = reinterpret_cast<std::uint64_t*>(xbufs + 2 * p.x_bytes);
  std::uint64_t* empty = full + p.slots;
  volatile int* x_tag = reinterpret_cast<volatile int*>(empty + p.slots);  // [2]: sub-layer + 1 of buffer b
  volatile float* x_rstd = reinterpret_cast<volatile float*>(x_tag + 2);   // [2]: its 1/rms (normed kinds)

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int consumers = blockDim.x / 32 - 1;
  const int begin = p.task_off[blockIdx.x], mine = p.task_off[blockIdx.x + 1] - begin;
  const Task* tasks = p.tasks + begin;
  const long long deadline = global_ns() + RING_PATIENCE_NS;
  if (threadIdx.x == 0) {
    for (int s = 0; s < p.slots; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 1);
    }
    x_tag[0] = x_tag[1] = 0;
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp == consumers) {  // producer: lane 0 alone; task i is the block's page i, in slot i % slots
    if (lane != 0) return;
    Task next = mine > 0 ? tasks[0] : Task{};
    for (int i = 0; i < mine; ++i) {
      const Task t = next;
      if (i + 1 < mine) next = tasks[i + 1];  // a task ahead: its load's latency behind this page's wait
      const Layer& L = p.layers[t.layer];
      const int s = i % p.slots;
      if (i >= p.slots && !mbar_wait_until(&empty[s], ((i / p.slots) - 1) & 1, deadline)) {
        give_up(p.diag, 1, warp, begin + i, s, i, ((i / p.slots) - 1) & 1, mine);
        return;
      }
      if (p.prof) p.prof[(begin + i) * kStamps] = global_ns();
      unsigned char* slot = ring + s * p.slot_bytes;
      const __nv_bfloat16* src;
      const __nv_bfloat16* src_v = nullptr;
      unsigned bytes;
      if (t.kind == kAttn) {  // keys at the slot's start, values page_positions rows on
        const long long at = (static_cast<long long>(t.head) * p.S + t.row0) * p.Dh;
        src = L.k + at;
        src_v = L.v + at;
        bytes = static_cast<unsigned>(t.rows) * p.Dh * 2;
      } else if (t.kind == kQkv) {
        src = L.wqkv + static_cast<long long>(t.row0) * p.D;
        bytes = t.rows * p.D * 2;
      } else if (t.kind == kO) {
        src = L.wo + static_cast<long long>(t.row0) * p.H * p.Dh;
        bytes = t.rows * p.H * p.Dh * 2;
      } else if (t.kind == kGateUp) {
        src = L.wgu + static_cast<long long>(t.row0) * 2 * p.D;
        bytes = 2 * t.rows * p.D * 2;
      } else {
        src = L.wd + static_cast<long long>(t.row0) * p.F;
        bytes = t.rows * p.F * 2;
      }
      if (bytes == 0 || p.mode == 2) {  // an empty page (an attention split of an empty cache), or compute only
        mbar_arrive(&full[s]);
      } else {
        mbar_expect_tx(&full[s], src_v ? 2 * bytes : bytes);
        bulk_copy(slot, src, bytes, &full[s]);
        if (src_v) bulk_copy(slot + p.page_positions * p.Dh * 2, src_v, bytes, &full[s]);
      }
    }
    return;
  }

  // consumer warp: its k-th task is warp + k * consumers; its count on a counter is released once it moves on to a
  // task counted on another
  int done_on = -1;
  unsigned done = 0;
  Task next = warp < mine ? tasks[warp] : Task{};
  for (int i = warp; i < mine; i += consumers) {
    const Task t = next;
    if (i + consumers < mine) next = tasks[i + consumers];  // a task ahead: its load's latency behind this task
    const Layer& L = p.layers[t.layer];
    const int sub = 5 * t.layer + t.kind, b = sub & 1;
    long long* stamp = p.prof && lane == 0 ? p.prof + (begin + i) * kStamps : nullptr;
    if (done && t.count_on != done_on) {  // every lane's stores of the counted tasks visible, then one release
      __threadfence();
      __syncwarp();
      if (lane == 0) red_release(p.counters + done_on, done);
      done = 0;
    }
    if (stamp) stamp[1] = global_ns();
    if (t.kind == kAttn || t.first) {  // wait for what the task reads: the sub-layer before, or its QKV rows
      if (t.wait_target > 0) {
        for (;;) {  // every lane's own acquire, the loop's exit warp-uniform (the sync ops below)
          const unsigned seen = load_acquire(p.counters + t.wait_on);
          if (__all_sync(0xffffffffu, seen >= static_cast<unsigned>(t.wait_target))) break;
          if (__any_sync(0xffffffffu, global_ns() > deadline)) {
            if (lane == 0) give_up(p.diag, 2, warp, begin + i, t.wait_on, seen, t.wait_target, mine);
            return;
          }
        }
      }
      __syncwarp();
    }
    float rstd = 1.f;
    unsigned char* xb = xbufs + b * p.x_bytes;
    if (t.kind != kAttn) {
      if (t.first) {  // this warp brings the sub-layer's x in for the block
        if (t.kind == kQkv || t.kind == kGateUp) {
          rstd = stage_norm(reinterpret_cast<uint4*>(xb), t.kind == kQkv ? L.h : L.hmid,
                            t.kind == kQkv ? L.norm_in : L.norm_post, p.D, p.eps, lane);
        } else {
          stage_x(reinterpret_cast<uint4*>(xb), t.kind == kO ? L.attn : L.act, t.kind == kO ? p.H * p.Dh : p.F,
                      lane);
        }
        __syncwarp();
        if (lane == 0) {
          x_rstd[b] = rstd;
          __threadfence_block();
          x_tag[b] = sub + 1;
        }
      } else {
        while (!__all_sync(0xffffffffu, x_tag[b] == sub + 1)) {
          if (__any_sync(0xffffffffu, global_ns() > deadline)) {
            if (lane == 0) give_up(p.diag, 3, warp, begin + i, sub, x_tag[b], sub + 1, mine);
            return;
          }
        }
        __threadfence_block();
        rstd = x_rstd[b];
      }
      __syncwarp();
    }
    if (stamp) stamp[2] = global_ns();

    if (t.kind == kAttn) {
      bool ok;
      switch (p.H / p.Hkv) {
        case 1: ok = attn_task<1>(t, p, L, ring, full, empty, deadline, stamp, warp, begin + i, mine, lane); break;
        case 2: ok = attn_task<2>(t, p, L, ring, full, empty, deadline, stamp, warp, begin + i, mine, lane); break;
        case 3: ok = attn_task<3>(t, p, L, ring, full, empty, deadline, stamp, warp, begin + i, mine, lane); break;
        default: ok = attn_task<4>(t, p, L, ring, full, empty, deadline, stamp, warp, begin + i, mine, lane); break;
      }
      if (!ok) return;
    } else {
      const int s = t.page0 % p.slots;
      if (!__all_sync(0xffffffffu, mbar_wait_until(&full[s], (t.page0 / p.slots) & 1, deadline))) {
        if (lane == 0) give_up(p.diag, 4, warp, begin + i, s, t.page0, (t.page0 / p.slots) & 1, mine);
        return;
      }
      if (stamp) stamp[3] = global_ns();
      const uint4* w = reinterpret_cast<const uint4*>(ring + s * p.slot_bytes);
      const uint4* xs = reinterpret_cast<const uint4*>(xb);
      switch (t.rows) {
        case 1: gemv_task<1>(t, p, L, w, xs, rstd, lane); break;
        case 2: gemv_task<2>(t, p, L, w, xs, rstd, lane); break;
        case 4: gemv_task<4>(t, p, L, w, xs, rstd, lane); break;
        default: gemv_task<8>(t, p, L, w, xs, rstd, lane); break;  // 8
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[s]);  // the sums needed every byte of the slot: refill it
    }
    if (stamp) stamp[4] = global_ns();
    done_on = t.count_on;
    ++done;
  }
  if (done) {
    __threadfence();
    __syncwarp();
    if (lane == 0) red_release(p.counters + done_on, done);
  }
}

bool group_supported(int g) {
  for (int k : kGroups)
    if (k == g) return true;
  return false;
}

}  // namespace

extern "C" const char* ring_layer_error(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

// Dynamic shared memory of one block: ring, two x buffers, the slots' barriers, two tags and two 1/rms.
extern "C" int ring_layer_smem(int slot_bytes, int slots, int x_bytes) {
  return slots * slot_bytes + 2 * x_bytes + 2 * slots * 8 + 16;
}

// Zeroes the counters, the tickets and diag, then launches on `stream` (capturable). ints: D, H, Hkv, Dh, F, S, pos,
// splits, slot_bytes, slots, x_bytes, page_positions, consumers, grid, counters (the array's length, tickets
// included), mode, tickets (their offset in it). Returns a cudaError_t;
// cudaErrorInvalidValue for shapes the kernel does not take, cudaErrorLaunchOutOfResources where the grid's blocks
// cannot all be resident (they wait on one another).
extern "C" int ring_layer_launch(const void* tasks, const int* task_off, const void* layers, unsigned* counters,
                                 const float* inv_freq, long long* prof, long long* diag, const int* ints, float eps,
                                 void* stream) {
  Params p{static_cast<const Task*>(tasks), task_off, static_cast<const Layer*>(layers), counters, nullptr, inv_freq,
           prof, diag};
  p.D = ints[0];
  p.H = ints[1];
  p.Hkv = ints[2];
  p.Dh = ints[3];
  p.F = ints[4];
  p.S = ints[5];
  p.pos = ints[6];
  p.splits = ints[7];
  p.slot_bytes = ints[8];
  p.slots = ints[9];
  p.x_bytes = ints[10];
  p.page_positions = ints[11];
  const int consumers = ints[12], grid = ints[13], n_counters = ints[14];
  p.mode = ints[15];
  p.tickets = counters + ints[16];
  p.eps = eps;
  p.scale = 1.4426950408889634f / sqrtf(static_cast<float>(p.Dh));
  if (consumers < 1 || consumers > kMaxConsumers || p.slots < 1 || p.slots % consumers || p.Dh % 32 ||
      p.Dh > 32 * kMaxLaneDims || p.Hkv < 1 || p.H % p.Hkv || !group_supported(p.H / p.Hkv) || p.D % 8 ||
      p.F % 8 || p.mode < 0 || p.mode > 2 || p.splits < 1 || p.splits > kMaxSplits)
    return cudaErrorInvalidValue;
  const auto st = static_cast<cudaStream_t>(stream);
  const int smem = ring_layer_smem(p.slot_bytes, p.slots, p.x_bytes);
  cudaError_t err = cudaFuncSetAttribute(ring_layer_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  int per_sm = 0, sms = 0, device = 0;
  err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess)
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, ring_layer_kernel, (consumers + 1) * 32, smem);
  if (err != cudaSuccess) return err;
  if (grid > per_sm * sms) return cudaErrorLaunchOutOfResources;
  err = cudaMemsetAsync(counters, 0, sizeof(unsigned) * n_counters, st);
  if (err == cudaSuccess) err = cudaMemsetAsync(diag, 0, 8 * sizeof(long long), st);
  if (err != cudaSuccess) return err;
  ring_layer_kernel<<<grid, (consumers + 1) * 32, smem, st>>>(p);
  return cudaGetLastError();
}
