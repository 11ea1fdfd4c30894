// fcnjax's direct convolution kernels for XLA:CPU, called through the XLA FFI (fcnjax/native.py builds this file
// with the machine's C++ compiler on first use; fcnjax/conv.py decides which convolutions use it).
//
// Stride-1 convolutions of NHWC float32 maps with HWIO kernels, any kernel size, padding and dilation:
// - ConvForward: y = conv(x, kernel). With flip = 1 also the input gradient: the forward convolution of dy with the
//   kernel turned by 180 degrees and its channel axes swapped (flip_kernel).
// - ConvWeightGrad: d(kernel) = sum over output pixels of x(tap) outer dy.
// Both keep a block of results in vector registers (7 or 6 pixels x 64 channels for the forward pass, 6 input x 64
// output channels for the weight gradient) and stream the other operands past it, the way oneDNN's direct kernels
// do; XLA:CPU's own convolution ran these layers at 60-90% of PyTorch's speed here (docs/performance.md). The vector
// type is GCC's generic one, so the file builds for any x86/ARM target; -march=native picks the widest units.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

inline v16 load(const float* p) { return *reinterpret_cast<const v16u*>(p); }
inline void store(float* p, v16 v) { *reinterpret_cast<v16u*>(p) = v; }
inline v16 bcast(float s) { return v16{s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s}; }

// A float buffer of at least n elements, taken from (and given back to) a process-wide pool. Fresh multi-MiB
// allocations are mapped anew by malloc on every call and page-faulted in as they are written: that cost 10-40 ms
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

// y[p, c*16..] for PW output pixels of a row and CB 16-channel vectors, summed over the taps and input channels
// [ci_lo, ci_hi) (added to what y holds unless ci_lo == 0). Pixels that a tap reads outside the row read `zeros`
// instead, so every block runs the same branch-free loop; pixels past the row's end are computed and not stored.
template <int CB, int PW>
inline void forward_block(const Geometry& g, const float* x_image, const float* kernel, const float* zeros,
                          float* y_row, int64_t oy, int64_t ox0, int64_t co0, int64_t ci_lo, int64_t ci_hi) {
  int64_t pixels = std::min<int64_t>(PW, g.ow - ox0);
  v16 acc[PW][CB];
  for (int p = 0; p < PW; ++p)
    for (int c = 0; c < CB; ++c)
      acc[p][c] = (ci_lo == 0 || p >= pixels) ? v16{} : load(y_row + (ox0 + p) * g.cout + co0 + 16 * c);
  for (int64_t i = 0; i < g.kh; ++i) {
    int64_t iy = oy - g.pad_top + i * g.dil_h;
    if (iy < 0 || iy >= g.h) continue;
    const float* x_row = x_image + iy * g.w * g.cin;
    for (int64_t j = 0; j < g.kw; ++j) {
      int64_t ix0 = ox0 - g.pad_left + j * g.dil_w;
      const float* k = kernel + ((i * g.kw + j) * g.cin + ci_lo) * g.cout + co0;
      const float* xp[PW];  // each pixel's input channels from ci_lo on
      for (int p = 0; p < PW; ++p) {
        int64_t ix = ix0 + p;
        xp[p] = ix >= 0 && ix < g.w && p < pixels ? x_row + ix * g.cin + ci_lo : zeros;
      }
      for (int64_t ci = 0; ci < ci_hi - ci_lo; ++ci) {
        v16 wv[CB];
        for (int c = 0; c < CB; ++c) wv[c] = load(k + ci * g.cout + 16 * c);
        for (int p = 0; p < PW; ++p) {
          v16 xb = bcast(xp[p][ci]);
          for (int c = 0; c < CB; ++c) acc[p][c] += xb * wv[c];
        }
      }
    }
  }
  for (int p = 0; p < pixels; ++p)
    for (int c = 0; c < CB; ++c) store(y_row + (ox0 + p) * g.cout + co0 + 16 * c, acc[p][c]);
}

// Output rows [r0, r1) (of all images, flattened) for output channels [co0, co0 + 16 * CB): per block of input
// channels, every row's pixel blocks, so that block's weights are read from cache by all of them.
template <int CB, int PW>
void forward_rows(const Geometry& g, const float* x, const float* kernel, const float* zeros, float* y, int64_t r0,
                  int64_t r1, int64_t co0, int64_t cin_block) {
  for (int64_t ci_lo = 0; ci_lo < g.cin; ci_lo += cin_block)
    for (int64_t row = r0; row < r1; ++row) {
      int64_t b = row / g.oh, oy = row % g.oh;
      const float* x_image = x + b * g.h * g.w * g.cin;
      float* y_row = y + row * g.ow * g.cout;
      for (int64_t ox0 = 0; ox0 < g.ow; ox0 += PW)
        forward_block<CB, PW>(g, x_image, kernel, zeros, y_row, oy, ox0, co0, ci_lo,
                              std::min(g.cin, ci_lo + cin_block));
    }
}

template <int CB, int PW>
void forward_task(const Geometry& g, const float* x, const float* kernel, const float* zeros, float* y, int64_t r0,
                  int64_t r1, int64_t cin_block) {
  int64_t co0 = 0;
  for (; co0 + 16 * CB <= g.cout; co0 += 16 * CB) forward_rows<CB, PW>(g, x, kernel, zeros, y, r0, r1, co0, cin_block);
  switch ((g.cout - co0) / 16) {  // the last 16-48 output channels
    case 3: forward_rows<3, 8>(g, x, kernel, zeros, y, r0, r1, co0, cin_block); break;
    case 2: forward_rows<2, 12>(g, x, kernel, zeros, y, r0, r1, co0, cin_block); break;
    case 1: forward_rows<1, 16>(g, x, kernel, zeros, y, r0, r1, co0, cin_block); break;
  }
}

void forward(ffi::ThreadPool& pool, const Geometry& g, const float* x, const float* kernel, float* y,
             int64_t cin_block, int64_t pixels_per_task) {
  std::vector<float> zeros(cin_block, 0.f);
  int64_t rows = g.n * g.oh;
  // About pixels_per_task output pixels per task, and as many tasks per thread (2 threads and 7 tasks would
  // leave one thread idle for a seventh of the time).
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t per_thread = std::max<int64_t>(1, rows * g.ow / (threads * pixels_per_task));
  int64_t tasks = std::min(rows, threads * per_thread);
  parallel_for(pool, tasks, [&](int64_t task) {
    int64_t r0 = rows * task / tasks, r1 = rows * (task + 1) / tasks;
    // 7 pixels where they divide the row (224, 112, 56, 28: no partial blocks) is 28 accumulators, one more than
    // the registers left; the spill costs less than the partial blocks and the extra weight loads of 6.
    if (g.ow % 7 == 0)
      forward_task<4, 7>(g, x, kernel, zeros.data(), y, r0, r1, cin_block);
    else
      forward_task<4, 6>(g, x, kernel, zeros.data(), y, r0, r1, cin_block);
  });
}

// d(kernel) accumulated into acc_kernel (kh, kw, cin, cout) over output rows [r0, r1) of all images flattened.
template <int CB, int CIB>
inline void weight_grad_block(const Geometry& g, const float* x, const float* dy, float* acc_kernel, int64_t r0,
                              int64_t r1, int64_t i, int64_t j, int64_t ci0, int64_t co0) {
  float* dk = acc_kernel + ((i * g.kw + j) * g.cin + ci0) * g.cout + co0;
  v16 acc[CIB][CB];
  for (int a = 0; a < CIB; ++a)
    for (int c = 0; c < CB; ++c) acc[a][c] = load(dk + a * g.cout + 16 * c);
  int64_t ox_lo = std::max<int64_t>(0, g.pad_left - j * g.dil_w);
  int64_t ox_hi = std::min<int64_t>(g.ow, g.w + g.pad_left - j * g.dil_w);
  for (int64_t row = r0; row < r1; ++row) {
    int64_t b = row / g.oh, oy = row % g.oh;
    int64_t iy = oy - g.pad_top + i * g.dil_h;
    if (iy < 0 || iy >= g.h) continue;
    const float* dy_p = dy + row * g.ow * g.cout + co0;
    const float* x_p = x + ((b * g.h + iy) * g.w - g.pad_left + j * g.dil_w) * g.cin + ci0;
    for (int64_t ox = ox_lo; ox < ox_hi; ++ox) {
      v16 d[CB];
      for (int c = 0; c < CB; ++c) d[c] = load(dy_p + ox * g.cout + 16 * c);
      const float* xv = x_p + ox * g.cin;
      for (int a = 0; a < CIB; ++a) {
        v16 xb = bcast(xv[a]);
        for (int c = 0; c < CB; ++c) acc[a][c] += xb * d[c];
      }
    }
  }
  for (int a = 0; a < CIB; ++a)
    for (int c = 0; c < CB; ++c) store(dk + a * g.cout + 16 * c, acc[a][c]);
}

template <int CB>
void weight_grad_rows(const Geometry& g, const float* x, const float* dy, float* acc_kernel, int64_t r0, int64_t r1,
                      int64_t co0) {
  constexpr int CIB = CB >= 4 ? 6 : CB == 3 ? 8 : CB == 2 ? 12 : 16;
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

// Output channels [co0, co1) of d(kernel), in 16 * CB blocks, over output rows [r0, r1) in blocks of
// rows_per_block (so that a block's x and dy stay in cache while every tap and input channel reads them).
void weight_grad_task(const Geometry& g, const float* x, const float* dy, float* acc, int64_t r0, int64_t r1,
                      int64_t co0, int64_t co1, int64_t rows_per_block) {
  for (int64_t b0 = r0; b0 < r1; b0 += rows_per_block) {
    int64_t b1 = std::min(r1, b0 + rows_per_block);
    int64_t co = co0;
    for (; co + 64 <= co1; co += 64) weight_grad_rows<4>(g, x, dy, acc, b0, b1, co);
    switch ((co1 - co) / 16) {
      case 3: weight_grad_rows<3>(g, x, dy, acc, b0, b1, co); break;
      case 2: weight_grad_rows<2>(g, x, dy, acc, b0, b1, co); break;
      case 1: weight_grad_rows<1>(g, x, dy, acc, b0, b1, co); break;
    }
  }
}

void weight_grad(ffi::ThreadPool& pool, const Geometry& g, const float* x, const float* dy, float* dk,
                 int64_t rows_per_block) {
  int64_t rows = g.n * g.oh;
  int64_t size = g.kh * g.kw * g.cin * g.cout;
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t co_blocks = (g.cout + 63) / 64;
  if (size > rows * g.ow * (g.cin + g.cout) && co_blocks >= threads) {
    // d(kernel) is bigger than the activations: each thread owns some output channels of it and reads all rows.
    std::memset(dk, 0, size * sizeof(float));
    parallel_for(pool, threads, [&](int64_t t) {
      int64_t co0 = 64 * (co_blocks * t / threads), co1 = std::min(g.cout, 64 * (co_blocks * (t + 1) / threads));
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

}  // namespace

// kernel (kh, kw, a, b) -> flipped (kh, kw, b, a), turned by 180 degrees: the kernel whose forward convolution of
// dy is the input gradient. One task per tap, in 8 x 8 tiles: the rows of a 2-4 KiB-strided matrix all fall in
// the same L1 set, and 32-row tiles evicted every line they wrote (XLA's transpose took 40-60 ms for a
// 3x3x2048x512 kernel).
void flip_kernel(ffi::ThreadPool& pool, const float* kernel, int64_t kh, int64_t kw, int64_t a, int64_t b,
                 float* flipped) {
  parallel_for(pool, kh * kw, [&](int64_t tap) {
    const float* src = kernel + (kh * kw - 1 - tap) * a * b;
    float* dst = flipped + tap * a * b;
    for (int64_t i0 = 0; i0 < a; i0 += 8)
      for (int64_t j0 = 0; j0 < b; j0 += 8)
        for (int64_t i = i0; i < std::min(a, i0 + 8); ++i)
          for (int64_t j = j0; j < std::min(b, j0 + 8); ++j) dst[j * a + i] = src[i * b + j];
  });
}

// flip == 0: y = conv(x, kernel). flip == 1: y = conv(x, flip_kernel(kernel)), the input gradient of a convolution
// with `kernel` when x is its dy (and the pads are the flipped ones).
static ffi::Error ConvForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                                  ffi::ResultBuffer<ffi::F32> y, int64_t pad_top, int64_t pad_left, int64_t dil_h,
                                  int64_t dil_w, int64_t flip, int64_t cin_block, int64_t pixels_per_task) {
  auto xd = x.dimensions(), kd = kernel.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("fcnjax ConvForward: x, kernel and y must be 4-D");
  int64_t cin = flip ? kd[3] : kd[2], cout = flip ? kd[2] : kd[3];
  if (cin != xd[3] || cout != yd[3] || yd[0] != xd[0] || cout % 16 || cin_block < 1 || pixels_per_task < 1)
    return ffi::Error::InvalidArgument("fcnjax ConvForward: needs x (n,h,w,cin), kernel (kh,kw,cin,cout) (or "
                                       "(kh,kw,cout,cin) with flip), y (n,oh,ow,cout), cout a multiple of 16");
  Geometry g{xd[0], xd[1], xd[2], cin, kd[0], kd[1], cout, yd[1], yd[2], pad_top, pad_left, dil_h, dil_w};
  const float* k = kernel.typed_data();
  std::unique_ptr<Scratch> flipped;
  if (flip) {
    flipped = std::make_unique<Scratch>(kd[0] * kd[1] * cin * cout);
    flip_kernel(pool, k, kd[0], kd[1], kd[2], kd[3], flipped->data());
    k = flipped->data();
  }
  forward(pool, g, x.typed_data(), k, y->typed_data(), cin_block, pixels_per_task);
  return ffi::Error::Success();
}

static ffi::Error ConvWeightGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                     ffi::ResultBuffer<ffi::F32> dk, int64_t pad_top, int64_t pad_left,
                                     int64_t dil_h, int64_t dil_w, int64_t rows_per_block) {
  auto xd = x.dimensions(), dyd = dy.dimensions(), kd = dk->dimensions();
  if (xd.size() != 4 || dyd.size() != 4 || kd.size() != 4 || kd[2] != xd[3] || kd[3] != dyd[3] || dyd[0] != xd[0] ||
      kd[3] % 16 || rows_per_block < 1)
    return ffi::Error::InvalidArgument("fcnjax ConvWeightGrad: needs x (n,h,w,cin), dy (n,oh,ow,cout), d(kernel) "
                                       "(kh,kw,cin,cout), cout a multiple of 16");
  Geometry g{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], kd[3], dyd[1], dyd[2], pad_top, pad_left, dil_h, dil_w};
  weight_grad(pool, g, x.typed_data(), dy.typed_data(), dk->typed_data(), rows_per_block);
  return ffi::Error::Success();
}

// Both calls take XLA's thread pool, two float32 operands and one result, and the window's padding and dilation.
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvForward, ConvForwardImpl,
                              WindowCallBinding()
                                  .Attr<int64_t>("flip")
                                  .Attr<int64_t>("cin_block")
                                  .Attr<int64_t>("pixels_per_task"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvWeightGrad, ConvWeightGradImpl,
                              WindowCallBinding().Attr<int64_t>("rows_per_block"));
