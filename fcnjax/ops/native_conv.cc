// fcnjax's direct convolution kernels for XLA:CPU, called through the XLA FFI (fcnjax/ops/native.py builds this
// file with the machine's C++ compiler on first use; fcnjax/ops/conv.py decides which convolutions use it).
//
// Stride-1 convolutions of NHWC float32 maps with HWIO kernels, any kernel size, padding and dilation:
// - ConvForward: y = conv(x, kernel). With flip = 1 also the input gradient: the forward convolution of dy with the
//   kernel turned by 180 degrees and its channel axes swapped (pack_kernel). With winograd_chunk_bytes > 0, a 3x3
//   kernel's convolution by Winograd's F(2x2, 3x3) instead (winograd_forward): 2.25x fewer multiply-adds.
// - ConvWeightGrad: d(kernel) = sum over output pixels of x(tap) outer dy.
// - DepthwiseForward, DepthwiseInputGrad, DepthwiseWeightGrad: a depthwise convolution (one channel per group, any
//   stride) and its gradients; XLA:CPU runs these as generic loops or per-tap sums 2-100x slower than PyTorch
//   (docs/performance.md).
// Both keep a block of results in vector registers and stream the other operands past it, the way oneDNN's direct
// kernels do; XLA:CPU's own convolution runs these layers at 60-90% of PyTorch's speed (docs/performance.md). The
// vector type is GCC's generic one, so the file builds for any x86/ARM target; -march=native picks the units. The
// blocks are sized for the registers the target has: with AVX-512 (32 registers of 16 floats) 7 or 6 pixels x 64
// channels for the forward pass and 6 input x 64 output channels for the weight gradient; otherwise (AVX2: 16
// registers of 8 floats) 6 pixels x 16 channels and 6 x 16. AVX-512's blocks on AVX2 would need 56 registers.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(FCNJAX_LANES)
constexpr int kLanes = FCNJAX_LANES;  // one target's blocks on another (tests/test_conv.py checks AVX-512's on AVX2)
#elif defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
// Output-channel vectors per block (forward and weight gradient): 64 channels with AVX-512, 16 otherwise.
constexpr int kVectors = kLanes == 16 ? 4 : 2;
constexpr int kBlockChannels = kLanes * kVectors;

typedef float vec __attribute__((vector_size(4 * kLanes)));
typedef float vec_unaligned __attribute__((vector_size(4 * kLanes), aligned(4)));

inline vec load(const float* p) { return *reinterpret_cast<const vec_unaligned*>(p); }
inline void store(float* p, vec v) { *reinterpret_cast<vec_unaligned*>(p) = v; }
template <size_t... lane>
inline vec bcast_lanes(float s, std::index_sequence<lane...>) {
  return vec{((void)lane, s)...};  // (vec{} + s would add a zero first: 0 + s is not s for s = -0)
}
inline vec bcast(float s) { return bcast_lanes(s, std::make_index_sequence<kLanes>()); }

// A float buffer of at least n elements, taken from (and given back to) a process-wide pool. Fresh multi-MiB
// allocations are mapped anew by malloc on every call and page-faulted in as they are written: that costs 10-40 ms
// per call for a 3x3x1024x512 kernel's flipped copy. The pool keeps one buffer per concurrent user, grown to the
// largest size asked for, for the life of the process.
class Scratch {
 public:
  explicit Scratch(size_t n) {
    {
      std::lock_guard<std::mutex> lock(mu());
      auto& free = buffers();
      if (!free.empty()) {
        buffer_ = std::move(free.back());
        free.pop_back();
      }
    }
    if (buffer_.size() < n) buffer_.resize(n);
  }
  ~Scratch() {
    std::lock_guard<std::mutex> lock(mu());
    buffers().push_back(std::move(buffer_));
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  float* data() { return buffer_.data(); }

 private:
  static std::mutex& mu() {
    static std::mutex m;
    return m;
  }
  static std::vector<std::vector<float>>& buffers() {
    static auto* b = new std::vector<std::vector<float>>();  // never destroyed: outlives every call
    return *b;
  }
  std::vector<float> buffer_;
};

// Runs body(chunk) for every chunk in [0, chunks), on the calling thread and on up to num_threads - 1 tasks of
// XLA's intra-op thread pool. Chunks are claimed from a shared counter, so the caller never waits for a task
// that has not started (no deadlock when the pool is busy). A task that starts after every chunk is claimed
// touches only `state`, which it co-owns; `body` runs only for claimed chunks, and the caller returns once those
// are done.
template <typename Body>
void parallel_for(ffi::ThreadPool& pool, int64_t chunks, const Body& body) {
  int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  if (helpers <= 0) {
    for (int64_t c = 0; c < chunks; ++c) body(c);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto work = [state, chunks, body_ptr = &body]() {
    int64_t finished = 0;
    for (int64_t c; (c = state->next.fetch_add(1)) < chunks; ++finished) (*body_ptr)(c);
    if (finished && state->done.fetch_add(finished) + finished == chunks) {
      std::lock_guard<std::mutex> lock(state->mu);
      state->cv.notify_all();
    }
  };
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == chunks; });
}

// Shapes and window of one convolution: x (n, h, w, cin), kernel (kh, kw, cin, cout), output (n, oh, ow, cout);
// output pixel (oy, ox) reads input (oy - pad_top + i * dil_h, ox - pad_left + j * dil_w) for tap (i, j), zero
// outside the map (the bottom and right padding follow from oh and ow).
struct Geometry {
  int64_t n, h, w, cin, kh, kw, cout, oh, ow, pad_top, pad_left, dil_h, dil_w;
};

// A map of `pixels` pixels x `channels` channels, as block_channels lays it out: per block of channels
// [c0, c0 + width) (`block` wide, the last one narrower), a (pixels, width) matrix at data + c0 * pixels. With
// block >= channels that is NHWC itself.
struct BlockedMap {
  const float* data;
  int64_t pixels, channels, block;
  // Pixel p's channels from c on (c and the ones read after it in one block), and the floats to the next pixel's.
  const float* at(int64_t p, int64_t c) const {
    int64_t c0 = c / block * block;
    return data + c0 * pixels + p * stride(c) + (c - c0);
  }
  int64_t stride(int64_t c) const { return std::min(block, channels - c / block * block); }
};

// Maps with at least this many channels are blocked: in NHWC a pixel's channels are then >= 512 bytes from the
// next pixel's, and at 512 channels (2 KiB) the pixels that a kernel block reads all fall in 2 of L1's 64 sets and
// come from L2 again and again (unblocked: 1.1-1.5x slower at 28x28x512, 2x at 2048 channels).
constexpr int64_t kMinBlockedChannels = 128;

// src (rows, w, channels) blocked by `block` channels (BlockedMap) into `storage` when it has kMinBlockedChannels
// or more, else src itself. One task per row.
BlockedMap block_channels(ffi::ThreadPool& pool, const float* src, int64_t rows, int64_t w, int64_t channels,
                          int64_t block, std::unique_ptr<Scratch>& storage) {
  if (channels < kMinBlockedChannels || block >= channels) return {src, rows * w, channels, channels};
  storage = std::make_unique<Scratch>(rows * w * channels);
  BlockedMap map{storage->data(), rows * w, channels, block};
  parallel_for(pool, rows, [&](int64_t row) {
    for (int64_t c0 = 0; c0 < channels; c0 += block) {
      float* dst = const_cast<float*>(map.at(row * w, c0));
      int64_t width = map.stride(c0);
      for (int64_t px = 0; px < w; ++px)
        std::memcpy(dst + px * width, src + (row * w + px) * channels + c0, width * sizeof(float));
    }
  });
  return map;
}

// y[p, c*kLanes..] for PW output pixels of a row and CB vectors of output channels, summed over the taps and input
// channels [ci_lo, ci_hi) (added to what y holds unless ci_lo == 0). x_image holds those input channels of the image,
// a pixel's x_stride floats apart (BlockedMap). `panel` holds the kernel's weights for these output channels,
// (kh, kw, cin, kLanes * CB) (pack_kernel). Pixels that a tap reads outside the row read `zeros` instead, so every
// block runs the same branch-free loop; pixels past the row's end are computed and not stored.
template <int CB, int PW>
inline void forward_block(const Geometry& g, const float* x_image, int64_t x_stride, const float* panel,
                          const float* zeros, float* y_row, int64_t oy, int64_t ox0, int64_t co0, int64_t ci_lo,
                          int64_t ci_hi) {
  int64_t pixels = std::min<int64_t>(PW, g.ow - ox0);
  vec acc[PW][CB];
  for (int p = 0; p < PW; ++p)
    for (int c = 0; c < CB; ++c)
      acc[p][c] = (ci_lo == 0 || p >= pixels) ? vec{} : load(y_row + (ox0 + p) * g.cout + co0 + kLanes * c);
  for (int64_t i = 0; i < g.kh; ++i) {
    int64_t iy = oy - g.pad_top + i * g.dil_h;
    if (iy < 0 || iy >= g.h) continue;
    const float* x_row = x_image + iy * g.w * x_stride;
    for (int64_t j = 0; j < g.kw; ++j) {
      int64_t ix0 = ox0 - g.pad_left + j * g.dil_w;
      const float* k = panel + ((i * g.kw + j) * g.cin + ci_lo) * (kLanes * CB);
      const float* xp[PW];  // each pixel's input channels from ci_lo on
      for (int p = 0; p < PW; ++p) {
        int64_t ix = ix0 + p;
        xp[p] = ix >= 0 && ix < g.w && p < pixels ? x_row + ix * x_stride : zeros;
      }
      for (int64_t ci = 0; ci < ci_hi - ci_lo; ++ci) {
        vec wv[CB];
        for (int c = 0; c < CB; ++c) wv[c] = load(k + (ci * CB + c) * kLanes);
        for (int p = 0; p < PW; ++p) {
          vec xb = bcast(xp[p][ci]);
          for (int c = 0; c < CB; ++c) acc[p][c] += xb * wv[c];
        }
      }
    }
  }
  for (int p = 0; p < pixels; ++p)
    for (int c = 0; c < CB; ++c) store(y_row + (ox0 + p) * g.cout + co0 + kLanes * c, acc[p][c]);
}

// Output rows [r0, r1) (of all images, flattened) for output channels [co0, co0 + kLanes * CB): per block of input
// channels, every row's pixel blocks, so that block's weights are read from cache by all of them.
template <int CB, int PW>
void forward_rows(const Geometry& g, const BlockedMap& x, const float* packed, const float* zeros, float* y,
                  int64_t r0, int64_t r1, int64_t co0, int64_t cin_block) {
  const float* panel = packed + co0 * g.kh * g.kw * g.cin;
  for (int64_t ci_lo = 0; ci_lo < g.cin; ci_lo += cin_block)
    for (int64_t row = r0; row < r1; ++row) {
      int64_t b = row / g.oh, oy = row % g.oh;
      float* y_row = y + row * g.ow * g.cout;
      for (int64_t ox0 = 0; ox0 < g.ow; ox0 += PW)
        forward_block<CB, PW>(g, x.at(b * g.h * g.w, ci_lo), x.stride(ci_lo), panel, zeros, y_row, oy, ox0, co0,
                              ci_lo, std::min(g.cin, ci_lo + cin_block));
    }
}

// PW pixels x kBlockChannels per block; the last output channels (fewer than kBlockChannels) in a narrower block
// with more pixels.
template <int PW>
void forward_task(const Geometry& g, const BlockedMap& x, const float* packed, const float* zeros, float* y,
                  int64_t r0, int64_t r1, int64_t cin_block) {
  int64_t co0 = 0;
  for (; co0 + kBlockChannels <= g.cout; co0 += kBlockChannels)
    forward_rows<kVectors, PW>(g, x, packed, zeros, y, r0, r1, co0, cin_block);
  switch ((g.cout - co0) / kLanes) {
    case 3: forward_rows<3, 8>(g, x, packed, zeros, y, r0, r1, co0, cin_block); break;
    case 2: forward_rows<2, 12>(g, x, packed, zeros, y, r0, r1, co0, cin_block); break;
    case 1: forward_rows<1, kLanes == 16 ? 16 : 12>(g, x, packed, zeros, y, r0, r1, co0, cin_block); break;
  }
}

void forward(ffi::ThreadPool& pool, const Geometry& g, const float* x, const float* packed, float* y,
             int64_t cin_block, int64_t pixels_per_task) {
  std::vector<float> zeros(cin_block, 0.f);
  std::unique_ptr<Scratch> storage;
  BlockedMap x_map = block_channels(pool, x, g.n * g.h, g.w, g.cin, cin_block, storage);
  int64_t rows = g.n * g.oh;
  // About pixels_per_task output pixels per task, and as many tasks per thread (2 threads and 7 tasks would
  // leave one thread idle for a seventh of the time).
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t per_thread = std::max<int64_t>(1, rows * g.ow / (threads * pixels_per_task));
  int64_t tasks = std::min(rows, threads * per_thread);
  parallel_for(pool, tasks, [&](int64_t task) {
    int64_t r0 = rows * task / tasks, r1 = rows * (task + 1) / tasks;
    // AVX-512: 7 pixels where they divide the row (224, 112, 56, 28: no partial blocks) is 28 accumulators, one
    // more than the registers left; the spill costs less than the partial blocks and the extra weight loads of 6.
    if (kLanes == 16 && g.ow % 7 == 0)
      forward_task<7>(g, x_map, packed, zeros.data(), y, r0, r1, cin_block);
    else
      forward_task<6>(g, x_map, packed, zeros.data(), y, r0, r1, cin_block);
  });
}

// Winograd's minimal filtering F(2x2, 3x3) (Lavin and Gray 2016) for 3x3 kernels: each 2x2 block of output pixels
// (a tile) of a channel is A^T [(G g G^T) . (B^T d B)] A, where d is the 4x4 input patch it reads and g the 3x3
// weights. Summed over input channels, the 16 products per tile are 16 matrix products, one per position (u, v) of
// the 4x4 transformed patch: M[uv] (tiles x cout) = V[uv] (tiles x cin) @ U[uv] (cin x cout). That is 16 multiply-
// adds per tile where the direct kernel does 36 (4 pixels x 9 taps): 2.25x fewer, for transforms that are adds.
// With dilation d, a tile's outputs are d apart (rows base and base + d), and so are its inputs.
constexpr int kWinogradPositions = 16;
constexpr int kWinogradTileRows = 6;  // tiles per register block of the matrix products (6 x kBlockChannels)

// The tiles of one axis: output positions [0, length) in tiles of 2 that are `dil` apart, `dil` tiles interleaved
// per 2 * dil outputs. Tile t's outputs are base(t) and base(t) + dil (the second one may be past the end).
struct TileAxis {
  int64_t length, dil;
  int64_t count() const { return (length + 2 * dil - 1) / (2 * dil) * dil; }
  int64_t base(int64_t t) const { return t / dil * 2 * dil + t % dil; }
};

// One chunk of tiles [t0, t0 + tiles) (of all images, in raster order) and its transformed operands: V (16, rows,
// cin) and M (16, rows, cout), rows = tiles rounded up to kWinogradTileRows.
struct WinogradChunk {
  int64_t t0, tiles, rows;
  float* v;
  float* m;
};

// Tile `tile` (of all images, in raster order): its image and its first output row and column.
struct TileOrigin {
  int64_t b, oy, ox;
};
inline TileOrigin tile_origin(const TileAxis& ty, const TileAxis& tx, int64_t tile) {
  int64_t per_image = ty.count() * tx.count();
  return {tile / per_image, ty.base(tile % per_image / tx.count()), tx.base(tile % tx.count())};
}

// B^T d for 4 vectors d (the transform of one axis; applied to both axes).
inline void input_transform(const vec (&d)[4], vec (&r)[4]) {
  r[0] = d[0] - d[2];
  r[1] = d[1] + d[2];
  r[2] = d[2] - d[1];
  r[3] = d[1] - d[3];
}

// V of the chunk's tiles [lo, hi): each tile's 4x4 input patch (zeros outside the map), transformed.
void winograd_input(const Geometry& g, const TileAxis& ty, const TileAxis& tx, const float* x, const float* zeros,
                    const WinogradChunk& c, int64_t lo, int64_t hi) {
  for (int64_t t = lo; t < hi; ++t) {
    float* v = c.v + t * g.cin;
    int64_t tile = c.t0 + t;
    if (t >= c.tiles) {  // padding rows of the last register block: zeros, never stored
      for (int64_t uv = 0; uv < kWinogradPositions; ++uv) std::memset(v + uv * c.rows * g.cin, 0, g.cin * 4);
      continue;
    }
    auto [b, oy, ox] = tile_origin(ty, tx, tile);
    const float* p[4][4];
    for (int u = 0; u < 4; ++u) {
      int64_t iy = oy - g.pad_top + u * g.dil_h;
      for (int w = 0; w < 4; ++w) {
        int64_t ix = ox - g.pad_left + w * g.dil_w;
        p[u][w] = iy >= 0 && iy < g.h && ix >= 0 && ix < g.w ? x + ((b * g.h + iy) * g.w + ix) * g.cin : zeros;
      }
    }
    for (int64_t ci = 0; ci < g.cin; ci += kLanes) {
      vec cols[4][4];  // B^T d: cols[u][w]
      for (int w = 0; w < 4; ++w) {
        vec d[4] = {load(p[0][w] + ci), load(p[1][w] + ci), load(p[2][w] + ci), load(p[3][w] + ci)}, r[4];
        input_transform(d, r);
        for (int u = 0; u < 4; ++u) cols[u][w] = r[u];
      }
      for (int u = 0; u < 4; ++u) {
        vec r[4];
        input_transform(cols[u], r);
        for (int w = 0; w < 4; ++w) store(v + (u * 4 + w) * c.rows * g.cin + ci, r[w]);
      }
    }
  }
}

// M[uv] rows [r0, r0 + 6) x output channels [co0, co0 + kLanes * CB) (+)= V[uv] rows @ U[uv] over input channels
// [ci_lo, ci_hi); `panel` is U[uv]'s block for these channels, (cin, width) (pack_winograd_kernel).
template <int CB>
inline void winograd_gemm_block(const float* v, int64_t cin, const float* panel, int64_t width, float* m,
                                int64_t cout, int64_t ci_lo, int64_t ci_hi) {
  constexpr int R = kWinogradTileRows;
  vec acc[R][CB];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CB; ++c) acc[r][c] = ci_lo == 0 ? vec{} : load(m + r * cout + kLanes * c);
  for (int64_t ci = ci_lo; ci < ci_hi; ++ci) {
    vec wv[CB];
    for (int c = 0; c < CB; ++c) wv[c] = load(panel + ci * width + c * kLanes);
    for (int r = 0; r < R; ++r) {
      vec xb = bcast(v[r * cin + ci]);
      for (int c = 0; c < CB; ++c) acc[r][c] += xb * wv[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CB; ++c) store(m + r * cout + kLanes * c, acc[r][c]);
}

// M[uv] for one position and one block of output channels, all of the chunk's rows, in passes of cin_block input
// channels (a pass's weights stay in L1 while every row reads them).
template <int CB>
void winograd_gemm(const Geometry& g, const WinogradChunk& c, const float* u, int64_t uv, int64_t co0,
                   int64_t cin_block) {
  int64_t width = std::min<int64_t>(kBlockChannels, g.cout - co0);
  const float* panel = u + uv * g.cin * g.cout + co0 * g.cin;
  const float* v = c.v + uv * c.rows * g.cin;
  float* m = c.m + uv * c.rows * g.cout + co0;
  for (int64_t ci_lo = 0; ci_lo < g.cin; ci_lo += cin_block)
    for (int64_t r0 = 0; r0 < c.rows; r0 += kWinogradTileRows)
      winograd_gemm_block<CB>(v + r0 * g.cin, g.cin, panel, width, m + r0 * g.cout, g.cout, ci_lo,
                              std::min(g.cin, ci_lo + cin_block));
}

// A^T m for 4 vectors m.
inline void output_transform(const vec (&m)[4], vec (&y)[2]) {
  y[0] = m[0] + m[1] + m[2];
  y[1] = m[1] - m[2] - m[3];
}

// y of the chunk's tiles [lo, hi): each tile's M transformed back to its 2x2 outputs (those inside the map).
void winograd_output(const Geometry& g, const TileAxis& ty, const TileAxis& tx, const WinogradChunk& c, float* y,
                     int64_t lo, int64_t hi) {
  for (int64_t t = lo; t < std::min(hi, c.tiles); ++t) {
    auto [b, oy, ox] = tile_origin(ty, tx, c.t0 + t);
    float* out[2][2];
    for (int a = 0; a < 2; ++a)
      for (int e = 0; e < 2; ++e) {
        int64_t py = oy + a * g.dil_h, px = ox + e * g.dil_w;
        out[a][e] = py < g.oh && px < g.ow ? y + ((b * g.oh + py) * g.ow + px) * g.cout : nullptr;
      }
    const float* m = c.m + t * g.cout;
    for (int64_t co = 0; co < g.cout; co += kLanes) {
      vec rows[2][4];  // A^T M: rows[a][w]
      for (int w = 0; w < 4; ++w) {
        vec col[4], r[2];
        for (int u = 0; u < 4; ++u) col[u] = load(m + (u * 4 + w) * c.rows * g.cout + co);
        output_transform(col, r);
        rows[0][w] = r[0];
        rows[1][w] = r[1];
      }
      for (int a = 0; a < 2; ++a) {
        vec r[2];
        output_transform(rows[a], r);
        for (int e = 0; e < 2; ++e)
          if (out[a][e]) store(out[a][e] + co, r[e]);
      }
    }
  }
}

// U (16, cin, cout) from the packed kernel (pack_kernel's panels, 3x3): G g G^T per input and output channel, laid
// out per block of output channels like the packed kernel, (cin, width) at u + uv * cin * cout + co0 * cin. One
// task per block and 64 input channels.
void pack_winograd_kernel(ffi::ThreadPool& pool, const float* packed, int64_t cin, int64_t cout, float* u) {
  int64_t blocks = (cout + kBlockChannels - 1) / kBlockChannels, per_block = (cin + 63) / 64;
  parallel_for(pool, blocks * per_block, [&](int64_t task) {
    int64_t co0 = task / per_block * kBlockChannels, width = std::min<int64_t>(kBlockChannels, cout - co0);
    const float* panel = packed + co0 * 9 * cin;  // (3, 3, cin, width)
    vec half = bcast(0.5f);
    for (int64_t ci = task % per_block * 64; ci < std::min(cin, task % per_block * 64 + 64); ++ci)
      for (int64_t c = 0; c < width; c += kLanes) {
        vec k[3][3], gk[4][3];  // gk = G g
        for (int i = 0; i < 3; ++i)
          for (int j = 0; j < 3; ++j) k[i][j] = load(panel + ((i * 3 + j) * cin + ci) * width + c);
        for (int j = 0; j < 3; ++j) {
          gk[0][j] = k[0][j];
          gk[1][j] = (k[0][j] + k[1][j] + k[2][j]) * half;
          gk[2][j] = (k[0][j] - k[1][j] + k[2][j]) * half;
          gk[3][j] = k[2][j];
        }
        for (int a = 0; a < 4; ++a) {
          vec r[4] = {gk[a][0], (gk[a][0] + gk[a][1] + gk[a][2]) * half, (gk[a][0] - gk[a][1] + gk[a][2]) * half,
                      gk[a][2]};
          for (int e = 0; e < 4; ++e) store(u + (a * 4 + e) * cin * cout + co0 * cin + ci * width + c, r[e]);
        }
      }
  });
}

// The forward convolution (3x3 kernel, cin a multiple of kLanes) by F(2x2, 3x3). With at most local_kernel_bytes of
// U, one task per chunk of tiles whose V and M fill about local_chunk_bytes: it transforms, multiplies and
// transforms back on its own, so V and M stay in that thread's L2. With a bigger U, which then comes from memory
// once per chunk, chunks whose V and M fill chunk_bytes or U's size, whichever is bigger, each shared by all
// threads: the input transform (tasks of tiles), the 16 products (a task per position and block of output
// channels), the output transform (tasks of tiles).
void winograd_forward(ffi::ThreadPool& pool, const Geometry& g, const float* x, const float* packed, float* y,
                      int64_t cin_block, int64_t chunk_bytes, int64_t local_kernel_bytes, int64_t local_chunk_bytes) {
  Scratch u(kWinogradPositions * g.cin * g.cout);
  pack_winograd_kernel(pool, packed, g.cin, g.cout, u.data());
  TileAxis ty{g.oh, g.dil_h}, tx{g.ow, g.dil_w};
  int64_t total = g.n * ty.count() * tx.count();
  int64_t row_bytes = kWinogradPositions * (g.cin + g.cout) * 4;
  int64_t blocks = (g.cout + kBlockChannels - 1) / kBlockChannels;
  auto gemm = [&](const WinogradChunk& c, int64_t task) {
    int64_t uv = task / blocks, co0 = task % blocks * kBlockChannels;
    if (co0 + kBlockChannels <= g.cout) return winograd_gemm<kVectors>(g, c, u.data(), uv, co0, cin_block);
    switch ((g.cout - co0) / kLanes) {  // the last output channels, fewer than kBlockChannels
      case 3: winograd_gemm<3>(g, c, u.data(), uv, co0, cin_block); break;
      case 2: winograd_gemm<2>(g, c, u.data(), uv, co0, cin_block); break;
      case 1: winograd_gemm<1>(g, c, u.data(), uv, co0, cin_block); break;
    }
  };
  std::vector<float> zeros(g.cin, 0.f);
  if (kWinogradPositions * g.cin * g.cout * 4 <= local_kernel_bytes) {
    int64_t tiles = std::max<int64_t>(kWinogradTileRows, local_chunk_bytes / row_bytes) / kWinogradTileRows *
                    kWinogradTileRows;
    int64_t chunks = (total + tiles - 1) / tiles;
    parallel_for(pool, chunks, [&](int64_t chunk) {
      Scratch v(kWinogradPositions * tiles * g.cin), m(kWinogradPositions * tiles * g.cout);
      WinogradChunk c{chunk * tiles, std::min(tiles, total - chunk * tiles), tiles, v.data(), m.data()};
      winograd_input(g, ty, tx, x, zeros.data(), c, 0, tiles);
      for (int64_t task = 0; task < kWinogradPositions * blocks; ++task) gemm(c, task);
      winograd_output(g, ty, tx, c, y, 0, tiles);
    });
    return;
  }
  int64_t tiles = std::max<int64_t>(kWinogradTileRows,
                                    std::max(chunk_bytes, kWinogradPositions * g.cin * g.cout * 4) / row_bytes);
  int64_t chunks = (total + tiles - 1) / tiles;
  tiles = (total + chunks - 1) / chunks;  // as even as they go
  int64_t rows = (tiles + kWinogradTileRows - 1) / kWinogradTileRows * kWinogradTileRows;
  Scratch v(kWinogradPositions * rows * g.cin), m(kWinogradPositions * rows * g.cout);
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t tile_tasks = std::min(rows, 4 * threads);
  for (int64_t t0 = 0; t0 < total; t0 += tiles) {
    WinogradChunk c{t0, std::min(tiles, total - t0), rows, v.data(), m.data()};
    parallel_for(pool, tile_tasks, [&](int64_t task) {
      winograd_input(g, ty, tx, x, zeros.data(), c, rows * task / tile_tasks, rows * (task + 1) / tile_tasks);
    });
    parallel_for(pool, kWinogradPositions * blocks, [&](int64_t task) { gemm(c, task); });
    parallel_for(pool, tile_tasks, [&](int64_t task) {
      winograd_output(g, ty, tx, c, y, c.rows * task / tile_tasks, c.rows * (task + 1) / tile_tasks);
    });
  }
}

// d(kernel) accumulated into acc_kernel (kh, kw, cin, cout) over output rows [r0, r1) of all images flattened.
template <int CB, int CIB>
inline void weight_grad_block(const Geometry& g, const BlockedMap& x, const BlockedMap& dy, float* acc_kernel,
                              int64_t r0, int64_t r1, int64_t i, int64_t j, int64_t ci0, int64_t co0) {
  float* dk = acc_kernel + ((i * g.kw + j) * g.cin + ci0) * g.cout + co0;
  vec acc[CIB][CB];
  for (int a = 0; a < CIB; ++a)
    for (int c = 0; c < CB; ++c) acc[a][c] = load(dk + a * g.cout + kLanes * c);
  int64_t ox_lo = std::max<int64_t>(0, g.pad_left - j * g.dil_w);
  int64_t ox_hi = std::min<int64_t>(g.ow, g.w + g.pad_left - j * g.dil_w);
  int64_t x_stride = x.stride(ci0), dy_stride = dy.stride(co0);
  for (int64_t row = r0; row < r1; ++row) {
    int64_t b = row / g.oh, oy = row % g.oh;
    int64_t iy = oy - g.pad_top + i * g.dil_h;
    if (iy < 0 || iy >= g.h) continue;
    const float* dy_p = dy.at(row * g.ow, co0);
    const float* x_p = x.at((b * g.h + iy) * g.w - g.pad_left + j * g.dil_w, ci0);
    for (int64_t ox = ox_lo; ox < ox_hi; ++ox) {
      vec d[CB];
      for (int c = 0; c < CB; ++c) d[c] = load(dy_p + ox * dy_stride + kLanes * c);
      const float* xv = x_p + ox * x_stride;
      for (int a = 0; a < CIB; ++a) {
        vec xb = bcast(xv[a]);
        for (int c = 0; c < CB; ++c) acc[a][c] += xb * d[c];
      }
    }
  }
  for (int a = 0; a < CIB; ++a)
    for (int c = 0; c < CB; ++c) store(dk + a * g.cout + kLanes * c, acc[a][c]);
}

template <int CB>
void weight_grad_rows(const Geometry& g, const BlockedMap& x, const BlockedMap& dy, float* acc_kernel, int64_t r0,
                      int64_t r1, int64_t co0) {
  // Input channels per block: as many as the registers hold next to CB vectors of dy.
  constexpr int CIB = kLanes == 16 ? (CB >= 4 ? 6 : CB == 3 ? 8 : CB == 2 ? 12 : 16) : (CB >= 2 ? 6 : 12);
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j) {
      int64_t ci0 = 0;
      for (; ci0 + CIB <= g.cin; ci0 += CIB) weight_grad_block<CB, CIB>(g, x, dy, acc_kernel, r0, r1, i, j, ci0, co0);
      switch (g.cin - ci0) {  // the last input channels, fewer than CIB, as one block
        case 0: break;
        case 1: weight_grad_block<CB, 1>(g, x, dy, acc_kernel, r0, r1, i, j, ci0, co0); break;
        case 2: weight_grad_block<CB, 2>(g, x, dy, acc_kernel, r0, r1, i, j, ci0, co0); break;
        case 3: weight_grad_block<CB, 3>(g, x, dy, acc_kernel, r0, r1, i, j, ci0, co0); break;
        case 4: weight_grad_block<CB, 4>(g, x, dy, acc_kernel, r0, r1, i, j, ci0, co0); break;
        case 5: weight_grad_block<CB, 5>(g, x, dy, acc_kernel, r0, r1, i, j, ci0, co0); break;
        default:
          for (; ci0 < g.cin; ++ci0) weight_grad_block<CB, 1>(g, x, dy, acc_kernel, r0, r1, i, j, ci0, co0);
      }
    }
}

// Output channels [co0, co1) of d(kernel), in kBlockChannels blocks, over output rows [r0, r1) in blocks of
// rows_per_block (so that a block's x and dy stay in cache while every tap and input channel reads them).
void weight_grad_task(const Geometry& g, const BlockedMap& x, const BlockedMap& dy, float* acc, int64_t r0,
                      int64_t r1, int64_t co0, int64_t co1, int64_t rows_per_block) {
  for (int64_t b0 = r0; b0 < r1; b0 += rows_per_block) {
    int64_t b1 = std::min(r1, b0 + rows_per_block);
    int64_t co = co0;
    for (; co + kBlockChannels <= co1; co += kBlockChannels) weight_grad_rows<kVectors>(g, x, dy, acc, b0, b1, co);
    switch ((co1 - co) / kLanes) {
      case 3: weight_grad_rows<3>(g, x, dy, acc, b0, b1, co); break;
      case 2: weight_grad_rows<2>(g, x, dy, acc, b0, b1, co); break;
      case 1: weight_grad_rows<1>(g, x, dy, acc, b0, b1, co); break;
    }
  }
}

// x's channels in blocks of 48, a multiple of every block of input channels that weight_grad_rows reads (6, 8, 12
// or 16), dy's in blocks of output channels.
constexpr int64_t kWeightGradInputBlock = 48;

void weight_grad(ffi::ThreadPool& pool, const Geometry& g, const float* x_nhwc, const float* dy_nhwc, float* dk,
                 int64_t block_bytes) {
  std::unique_ptr<Scratch> x_storage, dy_storage;
  BlockedMap x = block_channels(pool, x_nhwc, g.n * g.h, g.w, g.cin, kWeightGradInputBlock, x_storage);
  BlockedMap dy = block_channels(pool, dy_nhwc, g.n * g.oh, g.ow, g.cout, kBlockChannels, dy_storage);
  // As many rows per block as fit about block_bytes of the x and dy that a block of d(kernel) reads: each block
  // loads and stores every tile of d(kernel) once, and on small maps with many channels (28x28x512) those
  // strided tiles, not the FMAs, take most of the time with 4 rows (112 pixels) per block.
  int64_t rows_per_block = std::max<int64_t>(1, block_bytes / (g.ow * (x.stride(0) + dy.stride(0)) * 4));
  int64_t rows = g.n * g.oh;
  int64_t size = g.kh * g.kw * g.cin * g.cout;
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t co_blocks = (g.cout + kBlockChannels - 1) / kBlockChannels;
  if (size > rows * g.ow * (g.cin + g.cout) && co_blocks >= threads) {
    // d(kernel) is bigger than the activations: each thread owns some output channels of it and reads all rows.
    std::memset(dk, 0, size * sizeof(float));
    parallel_for(pool, threads, [&](int64_t t) {
      int64_t co0 = kBlockChannels * (co_blocks * t / threads);
      int64_t co1 = std::min(g.cout, kBlockChannels * (co_blocks * (t + 1) / threads));
      weight_grad_task(g, x, dy, dk, 0, rows, co0, co1, rows_per_block);
    });
    return;
  }
  // Otherwise one contiguous range of rows per thread: the first accumulates into dk, the others into scratch
  // buffers added to it at the end.
  threads = std::min(threads, rows);
  std::vector<std::unique_ptr<Scratch>> partial(threads);
  for (int64_t t = 1; t < threads; ++t) partial[t] = std::make_unique<Scratch>(size);
  parallel_for(pool, threads, [&](int64_t t) {
    float* acc = t == 0 ? dk : partial[t]->data();
    std::memset(acc, 0, size * sizeof(float));
    weight_grad_task(g, x, dy, acc, rows * t / threads, rows * (t + 1) / threads, 0, g.cout, rows_per_block);
  });
  for (int64_t t = 1; t < threads; ++t) {
    const float* part = partial[t]->data();
    for (int64_t e = 0; e < size; ++e) dk[e] += part[e];
  }
}

// One depthwise convolution: x (n, h, w, c), kernel (kh, kw, 1, c), output (n, oh, ow, c); output pixel (oy, ox)
// reads input (oy * stride_h - pad_top + i * dil_h, ox * stride_w - pad_left + j * dil_w) for tap (i, j).
struct DepthwiseGeometry {
  int64_t n, h, w, c, kh, kw, oh, ow, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w;
};

// y for PW output pixels from ox0 of row `row` and channels [c0, c0 + V * kLanes): the sum over taps of x(tap) times
// the tap's weights, PW x V accumulators in registers and each tap's V weight vectors loaded once for the PW pixels.
// A pixel whose tap reads padding reads `zeros` instead; pixels past the row's end are computed and not stored.
template <int V, int PW>
inline void depthwise_forward_block(const DepthwiseGeometry& g, const float* x, const float* kernel,
                                    const float* zeros, float* y, int64_t row, int64_t ox0, int64_t c0) {
  int64_t b = row / g.oh, oy = row % g.oh;
  int64_t pixels = std::min<int64_t>(PW, g.ow - ox0);
  vec acc[PW][V] = {};
  for (int64_t i = 0; i < g.kh; ++i) {
    int64_t iy = oy * g.stride_h - g.pad_top + i * g.dil_h;
    if (iy < 0 || iy >= g.h) continue;
    const float* x_row = x + (b * g.h + iy) * g.w * g.c + c0;
    for (int64_t j = 0; j < g.kw; ++j) {
      const float* xp[PW];
      for (int p = 0; p < PW; ++p) {
        int64_t ix = (ox0 + p) * g.stride_w - g.pad_left + j * g.dil_w;
        xp[p] = ix >= 0 && ix < g.w && p < pixels ? x_row + ix * g.c : zeros;
      }
      vec wv[V];
      for (int v = 0; v < V; ++v) wv[v] = load(kernel + (i * g.kw + j) * g.c + c0 + v * kLanes);
      for (int p = 0; p < PW; ++p)
        for (int v = 0; v < V; ++v) acc[p][v] += load(xp[p] + v * kLanes) * wv[v];
    }
  }
  float* y_row = y + (row * g.ow + ox0) * g.c + c0;
  for (int p = 0; p < pixels; ++p)
    for (int v = 0; v < V; ++v) store(y_row + p * g.c + v * kLanes, acc[p][v]);
}

// Channels [c0, c1), fewer than a vector, one at a time, for every pixel of row `row`.
void depthwise_forward_tail(const DepthwiseGeometry& g, const float* x, const float* kernel, float* y, int64_t row,
                            int64_t c0, int64_t c1) {
  int64_t b = row / g.oh, oy = row % g.oh;
  for (int64_t ox = 0; ox < g.ow; ++ox) {
    float* yp = y + (row * g.ow + ox) * g.c;
    for (int64_t c = c0; c < c1; ++c) yp[c] = 0.f;
    for (int64_t i = 0; i < g.kh; ++i) {
      int64_t iy = oy * g.stride_h - g.pad_top + i * g.dil_h;
      if (iy < 0 || iy >= g.h) continue;
      for (int64_t j = 0; j < g.kw; ++j) {
        int64_t ix = ox * g.stride_w - g.pad_left + j * g.dil_w;
        if (ix < 0 || ix >= g.w) continue;
        const float* xp = x + ((b * g.h + iy) * g.w + ix) * g.c;
        const float* kp = kernel + (i * g.kw + j) * g.c;
        for (int64_t c = c0; c < c1; ++c) yp[c] += xp[c] * kp[c];
      }
    }
  }
}

// One task per row of `rows` rows of `width` pixels and `channels` channels: block(V, PW, row, p0, c0) for blocks of
// PW pixels x V vectors of channels (V and PW as std::integral_constant) -- PW x V accumulators, V weights and one
// input vector in registers: 4 x 4 (AVX-512) or 3 x 2 (AVX2) for whole kBlockChannels, 6 or 4 pixels for single
// vectors -- then tail(row, c0) for the channels past the last whole vector.
template <int N>
using Int = std::integral_constant<int, N>;

template <typename Block, typename Tail>
void depthwise_rows(ffi::ThreadPool& pool, int64_t rows, int64_t width, int64_t channels, const Block& block,
                    const Tail& tail) {
  constexpr int PW = kLanes == 16 ? 4 : 3, PW1 = kLanes == 16 ? 6 : 4;
  int64_t whole = channels / kBlockChannels * kBlockChannels, vectors = channels / kLanes * kLanes;
  parallel_for(pool, rows, [&](int64_t row) {
    for (int64_t c0 = 0; c0 < whole; c0 += kBlockChannels)
      for (int64_t p0 = 0; p0 < width; p0 += PW) block(Int<kVectors>(), Int<PW>(), row, p0, c0);
    for (int64_t c0 = whole; c0 < vectors; c0 += kLanes)
      for (int64_t p0 = 0; p0 < width; p0 += PW1) block(Int<1>(), Int<PW1>(), row, p0, c0);
    if (vectors < channels) tail(row, vectors);
  });
}

// The depthwise convolution y = x * kernel: tasks of output rows, each row in blocks of pixels and channels.
void depthwise_forward(ffi::ThreadPool& pool, const DepthwiseGeometry& g, const float* x, const float* kernel,
                       float* y) {
  std::vector<float> zeros(kBlockChannels, 0.f);
  depthwise_rows(
      pool, g.n * g.oh, g.ow, g.c,
      [&](auto v, auto pw, int64_t row, int64_t ox0, int64_t c0) {
        depthwise_forward_block<decltype(v)::value, decltype(pw)::value>(g, x, kernel, zeros.data(), y, row, ox0, c0);
      },
      [&](int64_t row, int64_t c0) { depthwise_forward_tail(g, x, kernel, y, row, c0, g.c); });
}

// dx for PW input pixels from ix0 of input row `row` (over n x h) and channels [c0, c0 + V * kLanes): the sum over
// the taps (i, j) that carried this pixel to an output pixel (oy, ox) of dy(oy, ox) times the tap's weights. With a
// stride, only every stride-th tap offset lands on an output pixel; the others, and taps outside dy, read `zeros`.
template <int V, int PW>
inline void depthwise_input_grad_block(const DepthwiseGeometry& g, const float* dy, const float* kernel,
                                       const float* zeros, float* dx, int64_t row, int64_t ix0, int64_t c0) {
  int64_t b = row / g.h, iy = row % g.h;
  int64_t pixels = std::min<int64_t>(PW, g.w - ix0);
  vec acc[PW][V] = {};
  for (int64_t i = 0; i < g.kh; ++i) {
    int64_t ty = iy + g.pad_top - i * g.dil_h;
    if (ty < 0 || ty % g.stride_h || ty / g.stride_h >= g.oh) continue;
    const float* dy_row = dy + (b * g.oh + ty / g.stride_h) * g.ow * g.c + c0;
    for (int64_t j = 0; j < g.kw; ++j) {
      const float* dp[PW];
      bool any = false;
      for (int p = 0; p < PW; ++p) {
        int64_t tx = ix0 + p + g.pad_left - j * g.dil_w;
        bool valid = p < pixels && tx >= 0 && tx % g.stride_w == 0 && tx / g.stride_w < g.ow;
        dp[p] = valid ? dy_row + tx / g.stride_w * g.c : zeros;
        any |= valid;
      }
      if (!any) continue;
      vec wv[V];
      for (int v = 0; v < V; ++v) wv[v] = load(kernel + (i * g.kw + j) * g.c + c0 + v * kLanes);
      for (int p = 0; p < PW; ++p)
        for (int v = 0; v < V; ++v) acc[p][v] += load(dp[p] + v * kLanes) * wv[v];
    }
  }
  float* dx_row = dx + (row * g.w + ix0) * g.c + c0;
  for (int p = 0; p < pixels; ++p)
    for (int v = 0; v < V; ++v) store(dx_row + p * g.c + v * kLanes, acc[p][v]);
}

// Channels [c0, c1), fewer than a vector, one at a time, for every pixel of input row `row`.
void depthwise_input_grad_tail(const DepthwiseGeometry& g, const float* dy, const float* kernel, float* dx,
                               int64_t row, int64_t c0, int64_t c1) {
  int64_t b = row / g.h, iy = row % g.h;
  for (int64_t ix = 0; ix < g.w; ++ix) {
    float* dp = dx + (row * g.w + ix) * g.c;
    for (int64_t c = c0; c < c1; ++c) dp[c] = 0.f;
    for (int64_t i = 0; i < g.kh; ++i) {
      int64_t ty = iy + g.pad_top - i * g.dil_h;
      if (ty < 0 || ty % g.stride_h || ty / g.stride_h >= g.oh) continue;
      for (int64_t j = 0; j < g.kw; ++j) {
        int64_t tx = ix + g.pad_left - j * g.dil_w;
        if (tx < 0 || tx % g.stride_w || tx / g.stride_w >= g.ow) continue;
        const float* src = dy + ((b * g.oh + ty / g.stride_h) * g.ow + tx / g.stride_w) * g.c;
        const float* kp = kernel + (i * g.kw + j) * g.c;
        for (int64_t c = c0; c < c1; ++c) dp[c] += src[c] * kp[c];
      }
    }
  }
}

// d(input) of a depthwise convolution: tasks of input rows, each in blocks of pixels and channels.
void depthwise_input_grad(ffi::ThreadPool& pool, const DepthwiseGeometry& g, const float* dy, const float* kernel,
                          float* dx) {
  std::vector<float> zeros(kBlockChannels, 0.f);
  depthwise_rows(
      pool, g.n * g.h, g.w, g.c,
      [&](auto v, auto pw, int64_t row, int64_t ix0, int64_t c0) {
        depthwise_input_grad_block<decltype(v)::value, decltype(pw)::value>(g, dy, kernel, zeros.data(), dx, row,
                                                                           ix0, c0);
      },
      [&](int64_t row, int64_t c0) { depthwise_input_grad_tail(g, dy, kernel, dx, row, c0, g.c); });
}

// acc[(i, j), c0 .. c0 + V * kLanes) += sum over the output pixels of row `row` of x(tap (i, j)) * dy: for each tap
// row i, kw passes over the row's pixels, V vectors of accumulators in registers. Taps that read padding add nothing
// and are skipped (the columns a tap reads inside the row are [lo, hi)).
template <int V>
void depthwise_weight_grad_block(const DepthwiseGeometry& g, const float* x, const float* dy, float* acc,
                                 int64_t row, int64_t c0) {
  int64_t b = row / g.oh, oy = row % g.oh;
  const float* dy_row = dy + row * g.ow * g.c + c0;
  for (int64_t i = 0; i < g.kh; ++i) {
    int64_t iy = oy * g.stride_h - g.pad_top + i * g.dil_h;
    if (iy < 0 || iy >= g.h) continue;
    const float* x_row = x + (b * g.h + iy) * g.w * g.c + c0;
    for (int64_t j = 0; j < g.kw; ++j) {
      int64_t offset = j * g.dil_w - g.pad_left;  // input column of output column 0
      if (offset >= g.w) continue;
      int64_t lo = offset >= 0 ? 0 : (g.stride_w - 1 - offset) / g.stride_w;
      int64_t hi = std::min(g.ow, (g.w - 1 - offset) / g.stride_w + 1);
      float* a = acc + (i * g.kw + j) * g.c + c0;
      vec sum[V];
      for (int v = 0; v < V; ++v) sum[v] = load(a + v * kLanes);
      for (int64_t ox = lo; ox < hi; ++ox) {
        const float* xp = x_row + (ox * g.stride_w + offset) * g.c;
        const float* dp = dy_row + ox * g.c;
        for (int v = 0; v < V; ++v) sum[v] += load(xp + v * kLanes) * load(dp + v * kLanes);
      }
      for (int v = 0; v < V; ++v) store(a + v * kLanes, sum[v]);
    }
  }
}

// The same for channels [c0, c1), fewer than a vector, one at a time.
void depthwise_weight_grad_tail(const DepthwiseGeometry& g, const float* x, const float* dy, float* acc, int64_t row,
                                int64_t c0, int64_t c1) {
  int64_t b = row / g.oh, oy = row % g.oh;
  for (int64_t i = 0; i < g.kh; ++i) {
    int64_t iy = oy * g.stride_h - g.pad_top + i * g.dil_h;
    if (iy < 0 || iy >= g.h) continue;
    for (int64_t j = 0; j < g.kw; ++j)
      for (int64_t ox = 0; ox < g.ow; ++ox) {
        int64_t ix = ox * g.stride_w - g.pad_left + j * g.dil_w;
        if (ix < 0 || ix >= g.w) continue;
        const float* xp = x + ((b * g.h + iy) * g.w + ix) * g.c;
        const float* dp = dy + (row * g.ow + ox) * g.c;
        for (int64_t c = c0; c < c1; ++c) acc[(i * g.kw + j) * g.c + c] += xp[c] * dp[c];
      }
  }
}

// Output rows [r0, r1): each row's x and dy are read from memory once and stay in cache for every block of channels
// and every tap.
void depthwise_weight_grad_rows(const DepthwiseGeometry& g, const float* x, const float* dy, float* acc, int64_t r0,
                                int64_t r1) {
  for (int64_t row = r0; row < r1; ++row) {
    int64_t c0 = 0;
    for (; c0 + kBlockChannels <= g.c; c0 += kBlockChannels)
      depthwise_weight_grad_block<kVectors>(g, x, dy, acc, row, c0);
    for (; c0 + kLanes <= g.c; c0 += kLanes) depthwise_weight_grad_block<1>(g, x, dy, acc, row, c0);
    if (c0 < g.c) depthwise_weight_grad_tail(g, x, dy, acc, row, c0, g.c);
  }
}

// d(kernel) of a depthwise convolution: one contiguous range of output rows per thread, the first accumulating into
// dk, the others into scratch buffers added to it at the end (d(kernel) is small: kh x kw x c floats).
void depthwise_weight_grad(ffi::ThreadPool& pool, const DepthwiseGeometry& g, const float* x, const float* dy,
                           float* dk) {
  int64_t rows = g.n * g.oh, size = g.kh * g.kw * g.c;
  int64_t threads = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), rows));
  std::vector<std::unique_ptr<Scratch>> partial(threads);
  for (int64_t t = 1; t < threads; ++t) partial[t] = std::make_unique<Scratch>(size);
  parallel_for(pool, threads, [&](int64_t t) {
    float* acc = t == 0 ? dk : partial[t]->data();
    std::memset(acc, 0, size * sizeof(float));
    depthwise_weight_grad_rows(g, x, dy, acc, rows * t / threads, rows * (t + 1) / threads);
  });
  for (int64_t t = 1; t < threads; ++t) {
    const float* part = partial[t]->data();
    for (int64_t e = 0; e < size; ++e) dk[e] += part[e];
  }
}

}  // namespace

// The kernel as the forward pass reads it: per block of output channels [co0, co0 + width) (kBlockChannels wide, the
// last one narrower), a panel (kh, kw, cin, width) at packed + co0 * kh * kw * cin, so a block streams through
// contiguous weights. In HWIO, a weight row is cout floats apart; at 512 channels (2 KiB), the rows that a block
// reads all fall in 2 of L1's 64 sets and are fetched from L2 again and again (unpacked: 1.5x slower than XLA at
// 28x28x512). With flip, kernel is (kh, kw, cout, cin) and the panels hold it turned by 180 degrees, channel axes
// swapped: the kernel whose forward convolution of dy is the input gradient. One task per block and tap; with flip
// in 8 x 8 tiles, as the source's rows are cin floats apart.
void pack_kernel(ffi::ThreadPool& pool, const float* kernel, int64_t kh, int64_t kw, int64_t cin, int64_t cout,
                 bool flip, float* packed) {
  int64_t taps = kh * kw, blocks = (cout + kBlockChannels - 1) / kBlockChannels;
  parallel_for(pool, blocks * taps, [&](int64_t task) {
    int64_t co0 = task / taps * kBlockChannels, tap = task % taps;
    int64_t width = std::min<int64_t>(kBlockChannels, cout - co0);
    float* dst = packed + co0 * taps * cin + tap * cin * width;
    if (!flip) {
      for (int64_t ci = 0; ci < cin; ++ci)
        std::memcpy(dst + ci * width, kernel + (tap * cin + ci) * cout + co0, width * sizeof(float));
      return;
    }
    const float* src = kernel + (taps - 1 - tap) * cout * cin + co0 * cin;  // src[c * cin + ci]
    for (int64_t ci0 = 0; ci0 < cin; ci0 += 8)
      for (int64_t c0 = 0; c0 < width; c0 += 8)
        for (int64_t ci = ci0; ci < std::min(cin, ci0 + 8); ++ci)
          for (int64_t c = c0; c < std::min(width, c0 + 8); ++c) dst[ci * width + c] = src[c * cin + ci];
  });
}

// flip == 0: y = conv(x, kernel). flip == 1: y = conv(x, kernel flipped by pack_kernel), the input gradient of a
// convolution with `kernel` when x is its dy (and the pads are the flipped ones).
static ffi::Error ConvForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                                  ffi::ResultBuffer<ffi::F32> y, int64_t pad_top, int64_t pad_left, int64_t dil_h,
                                  int64_t dil_w, int64_t flip, int64_t panel_bytes, int64_t pixels_per_task,
                                  int64_t winograd_chunk_bytes, int64_t winograd_local_kernel_bytes,
                                  int64_t winograd_local_chunk_bytes) {
  auto xd = x.dimensions(), kd = kernel.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("fcnjax ConvForward: x, kernel and y must be 4-D");
  int64_t cin = flip ? kd[3] : kd[2], cout = flip ? kd[2] : kd[3];
  if (cin != xd[3] || cout != yd[3] || yd[0] != xd[0] || cout % 16 || panel_bytes < 1 || pixels_per_task < 1)
    return ffi::Error::InvalidArgument("fcnjax ConvForward: needs x (n,h,w,cin), kernel (kh,kw,cin,cout) (or "
                                       "(kh,kw,cout,cin) with flip), y (n,oh,ow,cout), cout a multiple of 16");
  Geometry g{xd[0], xd[1], xd[2], cin, kd[0], kd[1], cout, yd[1], yd[2], pad_top, pad_left, dil_h, dil_w};
  Scratch packed(kd[0] * kd[1] * cin * cout);
  pack_kernel(pool, kernel.typed_data(), kd[0], kd[1], cin, cout, flip != 0, packed.data());
  if (winograd_chunk_bytes > 0) {
    if (kd[0] != 3 || kd[1] != 3 || cin % kLanes)
      return ffi::Error::InvalidArgument("fcnjax ConvForward: Winograd needs a 3x3 kernel and input channels in "
                                         "whole vectors");
    // Input channels per pass of the products: a block's U for them (cin_block x kBlockChannels) fills about
    // panel_bytes.
    int64_t cin_block = std::max<int64_t>(8, panel_bytes / (kBlockChannels * sizeof(float)) / 8 * 8);
    winograd_forward(pool, g, x.typed_data(), packed.data(), y->typed_data(), cin_block, winograd_chunk_bytes,
                     winograd_local_kernel_bytes, winograd_local_chunk_bytes);
    return ffi::Error::Success();
  }
  // Input channels per pass: the weights that a pass of a block reads (kh x kw x cin_block x kBlockChannels) fill
  // about panel_bytes, whatever the vector width (32 x 64 channels with AVX-512, 128 x 16 with AVX2 for 3x3).
  int64_t cin_block = std::max<int64_t>(8, panel_bytes / (kd[0] * kd[1] * kBlockChannels * sizeof(float)) / 8 * 8);
  forward(pool, g, x.typed_data(), packed.data(), y->typed_data(), cin_block, pixels_per_task);
  return ffi::Error::Success();
}

static ffi::Error ConvWeightGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                     ffi::ResultBuffer<ffi::F32> dk, int64_t pad_top, int64_t pad_left,
                                     int64_t dil_h, int64_t dil_w, int64_t block_bytes) {
  auto xd = x.dimensions(), dyd = dy.dimensions(), kd = dk->dimensions();
  if (xd.size() != 4 || dyd.size() != 4 || kd.size() != 4 || kd[2] != xd[3] || kd[3] != dyd[3] || dyd[0] != xd[0] ||
      kd[3] % 16 || block_bytes < 1)
    return ffi::Error::InvalidArgument("fcnjax ConvWeightGrad: needs x (n,h,w,cin), dy (n,oh,ow,cout), d(kernel) "
                                       "(kh,kw,cin,cout), cout a multiple of 16");
  Geometry g{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], kd[3], dyd[1], dyd[2], pad_top, pad_left, dil_h, dil_w};
  weight_grad(pool, g, x.typed_data(), dy.typed_data(), dk->typed_data(), block_bytes);
  return ffi::Error::Success();
}

// The geometry of a depthwise convolution from the dimensions of its image (n, h, w, c), kernel (kh, kw, 1, c) and
// output (n, oh, ow, c), and its window; false when they do not fit together.
template <typename Dims>
bool depthwise_geometry(const Dims& image, const Dims& kernel, const Dims& out, int64_t pad_top, int64_t pad_left,
                        int64_t dil_h, int64_t dil_w, int64_t stride_h, int64_t stride_w, DepthwiseGeometry& g) {
  if (image.size() != 4 || kernel.size() != 4 || out.size() != 4 || kernel[2] != 1 || kernel[3] != image[3] ||
      out[3] != image[3] || out[0] != image[0] || stride_h < 1 || stride_w < 1)
    return false;
  g = {image[0], image[1], image[2], image[3], kernel[0], kernel[1], out[1], out[2], stride_h, stride_w, pad_top,
       pad_left, dil_h, dil_w};
  return true;
}

static ffi::Error DepthwiseWeightGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                          ffi::ResultBuffer<ffi::F32> dk, int64_t pad_top, int64_t pad_left,
                                          int64_t dil_h, int64_t dil_w, int64_t stride_h, int64_t stride_w) {
  DepthwiseGeometry g;
  if (!depthwise_geometry(x.dimensions(), dk->dimensions(), dy.dimensions(), pad_top, pad_left, dil_h, dil_w,
                          stride_h, stride_w, g))
    return ffi::Error::InvalidArgument("fcnjax DepthwiseWeightGrad: needs x (n,h,w,c), dy (n,oh,ow,c), d(kernel) "
                                       "(kh,kw,1,c), strides >= 1");
  depthwise_weight_grad(pool, g, x.typed_data(), dy.typed_data(), dk->typed_data());
  return ffi::Error::Success();
}

static ffi::Error DepthwiseForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                                       ffi::ResultBuffer<ffi::F32> y, int64_t pad_top, int64_t pad_left,
                                       int64_t dil_h, int64_t dil_w, int64_t stride_h, int64_t stride_w) {
  DepthwiseGeometry g;
  if (!depthwise_geometry(x.dimensions(), kernel.dimensions(), y->dimensions(), pad_top, pad_left, dil_h, dil_w,
                          stride_h, stride_w, g))
    return ffi::Error::InvalidArgument("fcnjax DepthwiseForward: needs x (n,h,w,c), kernel (kh,kw,1,c), "
                                       "y (n,oh,ow,c), strides >= 1");
  depthwise_forward(pool, g, x.typed_data(), kernel.typed_data(), y->typed_data());
  return ffi::Error::Success();
}

static ffi::Error DepthwiseInputGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> kernel,
                                         ffi::ResultBuffer<ffi::F32> dx, int64_t pad_top, int64_t pad_left,
                                         int64_t dil_h, int64_t dil_w, int64_t stride_h, int64_t stride_w) {
  DepthwiseGeometry g;
  if (!depthwise_geometry(dx->dimensions(), kernel.dimensions(), dy.dimensions(), pad_top, pad_left, dil_h, dil_w,
                          stride_h, stride_w, g))
    return ffi::Error::InvalidArgument("fcnjax DepthwiseInputGrad: needs dy (n,oh,ow,c), kernel (kh,kw,1,c), "
                                       "d(input) (n,h,w,c), strides >= 1");
  if (stride_h == 1 && stride_w == 1) {
    // Without a stride, d(input) is the forward convolution of dy with the kernel turned by 180 degrees and the
    // padding mirrored: the forward kernel, without the gather's per-tap index arithmetic (1.5-2x faster).
    int64_t taps = g.kh * g.kw;
    Scratch flipped(taps * g.c);
    for (int64_t t = 0; t < taps; ++t)
      std::memcpy(flipped.data() + t * g.c, kernel.typed_data() + (taps - 1 - t) * g.c, g.c * sizeof(float));
    DepthwiseGeometry turned{g.n, g.oh, g.ow, g.c, g.kh, g.kw, g.h, g.w, 1, 1, (g.kh - 1) * dil_h - pad_top,
                             (g.kw - 1) * dil_w - pad_left, dil_h, dil_w};
    depthwise_forward(pool, turned, dy.typed_data(), flipped.data(), dx->typed_data());
    return ffi::Error::Success();
  }
  depthwise_input_grad(pool, g, dy.typed_data(), kernel.typed_data(), dx->typed_data());
  return ffi::Error::Success();
}

// The calls take XLA's thread pool, two float32 operands and one result, and the window's padding and dilation.
static auto WindowCallBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("pad_top")
      .Attr<int64_t>("pad_left")
      .Attr<int64_t>("dil_h")
      .Attr<int64_t>("dil_w");
}

// Floats per vector in this build (fcnjax.ops.native.vector_lanes): fcnjax.ops.conv picks some forms by it.
extern "C" int FcnjaxVectorLanes() { return kLanes; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvForward, ConvForwardImpl,
                              WindowCallBinding()
                                  .Attr<int64_t>("flip")
                                  .Attr<int64_t>("panel_bytes")
                                  .Attr<int64_t>("pixels_per_task")
                                  .Attr<int64_t>("winograd_chunk_bytes")
                                  .Attr<int64_t>("winograd_local_kernel_bytes")
                                  .Attr<int64_t>("winograd_local_chunk_bytes"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvWeightGrad, ConvWeightGradImpl,
                              WindowCallBinding().Attr<int64_t>("block_bytes"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DepthwiseWeightGrad, DepthwiseWeightGradImpl,
                              WindowCallBinding().Attr<int64_t>("stride_h").Attr<int64_t>("stride_w"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DepthwiseForward, DepthwiseForwardImpl,
                              WindowCallBinding().Attr<int64_t>("stride_h").Attr<int64_t>("stride_w"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DepthwiseInputGrad, DepthwiseInputGradImpl,
                              WindowCallBinding().Attr<int64_t>("stride_h").Attr<int64_t>("stride_w"));
