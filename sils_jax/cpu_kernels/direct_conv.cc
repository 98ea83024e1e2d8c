// Direct CPU convolutions (NHWC float32 activations, HWIO kernels) with their input and
// weight gradients, as XLA FFI handlers, loaded by sils_jax/cpu_kernels/ffi.py, which
// compiles this file once per machine (-O3 -march=native):
//   - 3x3 stride-1 'SAME' to 1-3 output channels from 16k input channels (the decoder's
//     output conv, 16 -> 3);
//   - the decoder's 4x4 stride-2 up-convs in their phase form;
//   - 4x4 stride-2 'SAME' convs of even-sized inputs, 16k -> 16k channels (the encoders'
//     and discriminators').
//
// Why: in XLA's graph these convs are products of patch matrices, shifted sums,
// space-to-depth copies and phase interleaves, several times the memory traffic of the
// convs themselves. Here every output pixel reads its input window in place, with 16
// channels as one vector (GCC/Clang vector extensions: AVX-512 registers where the CPU
// has them, pairs of AVX2 registers or NEON elsewhere) and several pixels sharing every
// weight load.
//
// Work is split into fixed chunks of rows, run on the caller's thread and XLA's
// intra-op thread pool; each output element (and each chunk's partial weight
// gradient, added in chunk order) is computed by one chunk whatever thread runs it,
// so results do not depend on the thread count or timing.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;
typedef float v16 __attribute__((vector_size(64)));

inline v16 load(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }
// (not `(v16){} + s`: 0 + s may not fold away under IEEE rules, and costs an add)
inline v16 splat(float s) { return (v16){s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s}; }
inline float hsum(v16 v) {  // a shuffle tree: 4 shuffles and 4 adds
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
}

// Runs body(chunk) for chunk in [0, n) on the caller and the pool's threads. Each
// chunk runs exactly once; which thread runs it does not change any result.
template <typename Body>
void parallel_chunks(ffi::ThreadPool& pool, int64_t n, const Body& body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  const Body* b = &body;
  auto work = [state, b, n]() {
    for (int64_t c; (c = state->next.fetch_add(1)) < n;) {
      (*b)(c);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  // A helper that starts after every chunk is claimed returns at once and never touches
  // `body`, which may be gone by then; `state` lives as long as the last helper.
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  for (int64_t t = 0; t < helpers; ++t) {
    auto copy = work;
    pool.Schedule(std::move(copy));
  }
  work();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

struct Shape {
  int64_t rows, h, w, c, f;  // rows = batch * h
};

// wpack[((a * 3 + b) * nc + k) * F + f] = the 16 channels 16k.. of tap (a, b), output f.
template <int F>
std::vector<v16> pack_weights(const float* w, int64_t c) {
  int64_t nc = c / kLanes;
  std::vector<v16> out(9 * nc * F);
  for (int t = 0; t < 9; ++t)
    for (int64_t k = 0; k < nc; ++k)
      for (int f = 0; f < F; ++f) {
        v16 v;
        for (int l = 0; l < kLanes; ++l) v[l] = w[(t * c + k * kLanes + l) * F + f];
        out[(t * nc + k) * F + f] = v;
      }
  return out;
}

constexpr int64_t kRowsPerChunk = 8;
// Runs body(r) for every row r in [0, rows), in fixed chunks of kRowsPerChunk rows.
template <typename Body>
void parallel_rows(ffi::ThreadPool& pool, int64_t rows, const Body& body) {
  parallel_chunks(pool, (rows + kRowsPerChunk - 1) / kRowsPerChunk, [&](int64_t chunk) {
    for (int64_t r = chunk * kRowsPerChunk; r < std::min(rows, (chunk + 1) * kRowsPerChunk); ++r) body(r);
  });
}

// Runs block(j, std::integral_constant<int, Q>()) over [j, end): blocks of Q = P pixels,
// then of P / 2, ..., 1 for the rest.
template <int P, typename Block>
inline void in_blocks(int64_t j, int64_t end, const Block& block) {
  for (; j + P <= end; j += P) block(j, std::integral_constant<int, P>());
  if constexpr (P > 1) in_blocks<P / 2>(j, end, block);
}

// out = the sum of `chunks` partials of `size` floats each, added in chunk order.
inline void sum_partials(const float* partial, int64_t chunks, int64_t size, float* out) {
  std::fill(out, out + size, 0.f);
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const float* part = partial + chunk * size;
    for (int64_t e = 0; e < size; ++e) out[e] += part[e];
  }
}

// The weight gradients keep one partial (the kernel's size) per chunk: at most this many
// chunks, with more rows each for large inputs, to bound that memory. 16 rather than 64:
// fewer partials to write and add, 0.77-0.97 of the weight gradients' time where it
// changed their chunks (benchmarks/README.md); a fixed count, so
// the sums do not depend on the thread count.
constexpr int64_t kMaxGradChunks = 16;
inline int64_t grad_rows_per_chunk(int64_t rows) {
  return std::max(kRowsPerChunk, (rows + kMaxGradChunks - 1) / kMaxGradChunks);
}

// One output pixel: for every tap inside the image, its C channels (NC vectors) times
// the tap's weights. Border pixels check the taps; the others do not.
template <int F, int NC, bool kBorder>
inline void forward_pixel(const Shape& s, const float* x, const v16* wv, int64_t img, int64_t i,
                          int64_t j, float* yp) {
  const int64_t nc = NC > 0 ? NC : s.c / kLanes;
  v16 acc[F] = {};
  for (int a = 0; a < 3; ++a) {
    int64_t ii = i + a - 1;
    if (kBorder && (ii < 0 || ii >= s.h)) continue;
    const float* xrow = x + ((img * s.h + ii) * s.w) * s.c;
    for (int b = 0; b < 3; ++b) {
      int64_t jj = j + b - 1;
      if (kBorder && (jj < 0 || jj >= s.w)) continue;
      const float* xp = xrow + jj * s.c;
      const v16* wt = wv + (a * 3 + b) * nc * F;
      for (int64_t k = 0; k < nc; ++k) {
        v16 xv = load(xp + k * kLanes);
        for (int f = 0; f < F; ++f) acc[f] += xv * wt[k * F + f];
      }
    }
  }
  for (int f = 0; f < F; ++f) yp[f] = hsum(acc[f]);
}

template <int F, int NC>
void forward(ffi::ThreadPool& pool, const Shape& s, const float* x, const float* w, float* y) {
  std::vector<v16> wp = pack_weights<F>(w, s.c);
  const v16* wv = wp.data();
  parallel_rows(pool, s.rows, [&](int64_t r) {
    int64_t i = r % s.h, img = r / s.h;
    float* yr = y + r * s.w * F;
    if (i == 0 || i == s.h - 1 || s.w < 3) {
      for (int64_t j = 0; j < s.w; ++j) forward_pixel<F, NC, true>(s, x, wv, img, i, j, yr + j * F);
      return;
    }
    forward_pixel<F, NC, true>(s, x, wv, img, i, 0, yr);
    for (int64_t j = 1; j < s.w - 1; ++j) forward_pixel<F, NC, false>(s, x, wv, img, i, j, yr + j * F);
    forward_pixel<F, NC, true>(s, x, wv, img, i, s.w - 1, yr + (s.w - 1) * F);
  });
}

// dx[i, j, ch] = sum over taps (a, b) and f of dy[i - a + 1, j - b + 1, f] w[a, b, ch, f],
// for P pixels (i, j0 + p) at once: P independent accumulators (one pixel alone is a chain
// of 9 F dependent FMAs) sharing each weight load. kBorder: the taps may fall outside.
template <int F, int NC, int P, bool kBorder>
inline void input_grad_block(const Shape& s, const float* dy, const v16* wv, int64_t img, int64_t i,
                             int64_t j0, float* dxp) {
  const int64_t nc = NC > 0 ? NC : s.c / kLanes;
  for (int64_t k = 0; k < nc; ++k) {
    v16 acc[P] = {};
    for (int a = 0; a < 3; ++a) {
      int64_t ii = i - a + 1;
      if (kBorder && (ii < 0 || ii >= s.h)) continue;
      const float* dyrow = dy + ((img * s.h + ii) * s.w) * F;
      for (int b = 0; b < 3; ++b) {
        const v16* wt = wv + ((a * 3 + b) * nc + k) * F;
        v16 wf[F];
        for (int f = 0; f < F; ++f) wf[f] = wt[f];
        for (int p = 0; p < P; ++p) {
          int64_t jj = j0 + p - b + 1;
          if (kBorder && (jj < 0 || jj >= s.w)) continue;
          const float* d = dyrow + jj * F;
          for (int f = 0; f < F; ++f) acc[p] += splat(d[f]) * wf[f];
        }
      }
    }
    for (int p = 0; p < P; ++p) store(dxp + p * s.c + k * kLanes, acc[p]);
  }
}

template <int F, int NC>
void input_grad(ffi::ThreadPool& pool, const Shape& s, const float* dy, const float* w, float* dx) {
  constexpr int P = 8;
  std::vector<v16> wp = pack_weights<F>(w, s.c);
  const v16* wv = wp.data();
  parallel_rows(pool, s.rows, [&](int64_t r) {
    int64_t i = r % s.h, img = r / s.h;
    float* dxr = dx + r * s.w * s.c;
    if (i == 0 || i == s.h - 1 || s.w < 3) {
      for (int64_t j = 0; j < s.w; ++j) input_grad_block<F, NC, 1, true>(s, dy, wv, img, i, j, dxr + j * s.c);
      return;
    }
    input_grad_block<F, NC, 1, true>(s, dy, wv, img, i, 0, dxr);
    in_blocks<P>(1, s.w - 1, [&](int64_t j, auto q) {  // inner pixels: every tap inside
      input_grad_block<F, NC, decltype(q)::value, false>(s, dy, wv, img, i, j, dxr + j * s.c);
    });
    input_grad_block<F, NC, 1, true>(s, dy, wv, img, i, s.w - 1, dxr + (s.w - 1) * s.c);
  });
}

// dw[a, b, ch, f] = sum over positions of x[i + a - 1, j + b - 1, ch] dy[i, j, f]; each
// chunk of rows sums into its own partial, and the partials are added in chunk order.
template <int F>
void weight_grad(ffi::ThreadPool& pool, const Shape& s, const float* x, const float* dy, float* dw) {
  const int64_t nc = s.c / kLanes;
  int64_t chunks = (s.rows + kRowsPerChunk - 1) / kRowsPerChunk;
  // every chunk writes all of its partial: no zero-filling
  std::unique_ptr<v16[]> partial(new v16[chunks * 9 * nc * F]);
  parallel_chunks(pool, chunks, [&](int64_t chunk) {
    for (int64_t k = 0; k < nc; ++k) {
      v16 acc[9][F] = {};
      for (int64_t r = chunk * kRowsPerChunk; r < std::min(s.rows, (chunk + 1) * kRowsPerChunk); ++r) {
        int64_t i = r % s.h, img = r / s.h;
        for (int64_t j = 0; j < s.w; ++j) {
          const float* d = dy + (r * s.w + j) * F;
          v16 dv[F];
          for (int f = 0; f < F; ++f) dv[f] = splat(d[f]);
          for (int a = 0; a < 3; ++a) {
            int64_t ii = i + a - 1;
            if (ii < 0 || ii >= s.h) continue;
            const float* xrow = x + ((img * s.h + ii) * s.w) * s.c + k * kLanes;
            for (int b = 0; b < 3; ++b) {
              int64_t jj = j + b - 1;
              if (jj < 0 || jj >= s.w) continue;
              v16 xv = load(xrow + jj * s.c);
              for (int f = 0; f < F; ++f) acc[a * 3 + b][f] += xv * dv[f];
            }
          }
        }
      }
      for (int t = 0; t < 9; ++t)
        for (int f = 0; f < F; ++f) partial[((chunk * 9 + t) * nc + k) * F + f] = acc[t][f];
    }
  });
  for (int t = 0; t < 9; ++t)
    for (int64_t k = 0; k < nc; ++k)
      for (int f = 0; f < F; ++f) {
        v16 sum = {};
        for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += partial[((chunk * 9 + t) * nc + k) * F + f];
        for (int l = 0; l < kLanes; ++l) dw[(t * s.c + k * kLanes + l) * F + f] = sum[l];
      }
}

// act: the conv's input x (gradient = false) or its output gradient dy (gradient = true)
ffi::Error check(ffi::Buffer<ffi::F32>& act, ffi::Buffer<ffi::F32>& w, bool gradient, Shape* s) {
  auto ad = act.dimensions();
  auto wd = w.dimensions();
  if (ad.size() != 4 || wd.size() != 4 || wd[0] != 3 || wd[1] != 3)
    return ffi::Error::InvalidArgument("direct_conv: expected NHWC activations and a 3x3 HWIO kernel");
  s->h = ad[1];
  s->w = ad[2];
  s->rows = ad[0] * ad[1];
  s->c = wd[2];
  s->f = wd[3];
  if (ad[3] != (gradient ? s->f : s->c)) return ffi::Error::InvalidArgument("direct_conv: channel mismatch");
  if (s->c % kLanes != 0 || s->f < 1 || s->f > 3)
    return ffi::Error::InvalidArgument("direct_conv: needs input channels a multiple of 16 and 1-3 outputs");
  return ffi::Error::Success();
}

template <template <int> class Op, typename... Args>
void dispatch(int64_t f, Args&&... args) {
  if (f == 1) Op<1>::run(args...);
  if (f == 2) Op<2>::run(args...);
  if (f == 3) Op<3>::run(args...);
}
template <int F> struct Fwd { template <typename... A> static void run(const Shape& s, A&&... a) {
  if (s.c == kLanes) forward<F, 1>(a...); else forward<F, 0>(a...); } };
template <int F> struct Dx { template <typename... A> static void run(const Shape& s, A&&... a) {
  if (s.c == kLanes) input_grad<F, 1>(a...); else input_grad<F, 0>(a...); } };
template <int F> struct Dw { template <typename... A> static void run(A&&... a) { weight_grad<F>(a...); } };

ffi::Error FwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y) {
  Shape s;
  if (auto e = check(x, w, false, &s); e.failure()) return e;
  dispatch<Fwd>(s.f, s, pool, s, x.typed_data(), w.typed_data(), y->typed_data());
  return ffi::Error::Success();
}

ffi::Error DxImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                  ffi::ResultBuffer<ffi::F32> dx) {
  Shape s;
  if (auto e = check(dy, w, true, &s); e.failure()) return e;
  dispatch<Dx>(s.f, s, pool, s, dy.typed_data(), w.typed_data(), dx->typed_data());
  return ffi::Error::Success();
}

ffi::Error DwImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                  ffi::ResultBuffer<ffi::F32> dw) {
  Shape s;
  auto xd = x.dimensions();
  auto dd = dy.dimensions();
  auto wd = dw->dimensions();
  if (xd.size() != 4 || dd.size() != 4 || wd.size() != 4 || wd[0] != 3 || wd[1] != 3)
    return ffi::Error::InvalidArgument("direct_conv: expected NHWC x, dy and a 3x3 HWIO kernel");
  s = {xd[0] * xd[1], xd[1], xd[2], wd[2], wd[3]};
  if (xd[3] != s.c || dd[0] != xd[0] || dd[1] != xd[1] || dd[2] != xd[2] || dd[3] != s.f ||
      s.c % kLanes != 0 || s.f < 1 || s.f > 3)
    return ffi::Error::InvalidArgument("direct_conv: unsupported channels");
  dispatch<Dw>(s.f, pool, s, x.typed_data(), dy.typed_data(), dw->typed_data());
  return ffi::Error::Success();
}


// ---------------------------------------------------------------------------------
// The decoder's up-convs: ConvTranspose(F, (4, 4), strides (2, 2), 'SAME') in the phase
// form of sils_jax/cpu_kernels/upconv.py. With K = phase_kernel(kernel) as (2, 2, C, 2, 2,
// F), indices (a, c, ch, py, px, f), output pixel (2m + py, 2n + px) of an H x W input is
//   y[2m + py, 2n + px, f] = sum over a, c, ch of x[m + py + a - 1, n + px + c - 1, ch]
//                            K[a, c, ch, py, px, f],
// zero outside the input. F and C are multiples of 16 (vectors over f forward and in the
// weight gradient, over ch in the input gradient).

bool up_supported(int64_t c, int64_t f) {
  return (c == 16 || c == 32 || c == 64 || c == 128) && (f == 16 || f == 32 || f == 64);
}

struct UpShape {
  int64_t b, h, w, c, f;  // input N, H, W, C; output channels F
};

inline const float* kernel_at(const UpShape& s, const float* k, int a, int c, int64_t ch, int py, int px) {
  return k + ((((a * 2 + c) * s.c + ch) * 2 + py) * 2 + px) * s.f;
}

// Output pixels (2m + py, 2(n0 + p) + px), p < P, of image img: P pixels share every
// weight load. kCheck: the columns may fall outside the input (the first and last).
template <int NF, int P, bool kCheck>
inline void up_forward_block(const UpShape& s, const float* x, const float* k, int64_t img, int64_t m,
                             int py, int64_t n0, int px, float* y) {
  v16 acc[P][NF] = {};
  for (int a = 0; a < 2; ++a) {
    int64_t i = m + py + a - 1;
    if (i < 0 || i >= s.h) continue;
    for (int c = 0; c < 2; ++c) {
      int64_t col0 = n0 + px + c - 1;
      const float* xc = x + ((img * s.h + i) * s.w + col0) * s.c;
      bool valid[P];
      for (int p = 0; p < P; ++p) valid[p] = !kCheck || (col0 + p >= 0 && col0 + p < s.w);
      for (int64_t ch = 0; ch < s.c; ++ch) {
        const float* wk = kernel_at(s, k, a, c, ch, py, px);
        v16 wv[NF];
        for (int q = 0; q < NF; ++q) wv[q] = load(wk + q * kLanes);
        for (int p = 0; p < P; ++p) {
          if (kCheck && !valid[p]) continue;
          v16 xv = splat(xc[p * s.c + ch]);
          for (int q = 0; q < NF; ++q) acc[p][q] += xv * wv[q];
        }
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    float* yp = y + ((img * 2 * s.h + 2 * m + py) * 2 * s.w + 2 * (n0 + p) + px) * s.f;
    for (int q = 0; q < NF; ++q) store(yp + q * kLanes, acc[p][q]);
  }
}

template <int NF>
void up_forward(ffi::ThreadPool& pool, const UpShape& s, const float* x, const float* k, float* y) {
  constexpr int P = NF == 1 ? 8 : 4;
  int64_t rows = s.b * s.h;  // input rows m; each gives output rows 2m and 2m + 1
  parallel_rows(pool, rows, [&](int64_t r) {
    int64_t img = r / s.h, m = r % s.h;
    for (int py = 0; py < 2; ++py)
      for (int px = 0; px < 2; ++px) {
        // blocks of P columns; those holding the first or last column check theirs
        int64_t n = 0;
        for (; n + P <= s.w; n += P) {
          if (n == 0 || n + P == s.w) up_forward_block<NF, P, true>(s, x, k, img, m, py, n, px, y);
          else up_forward_block<NF, P, false>(s, x, k, img, m, py, n, px, y);
        }
        for (; n < s.w; ++n) up_forward_block<NF, 1, true>(s, x, k, img, m, py, n, px, y);
      }
  });
}

// dx[i, j, ch] = sum over (py, a, px, c) with m = i + 1 - py - a, n = j + 1 - px - c inside,
// and f, of dy[2m + py, 2n + px, f] K[a, c, ch, py, px, f]; kt holds K as
// (a, c, py, px, f, ch) so that ch is contiguous.
template <int NC, int P, bool kCheck>
inline void up_input_grad_block(const UpShape& s, const float* dy, const float* kt, int64_t img, int64_t i,
                                int64_t j0, float* dx) {
  v16 acc[P][NC] = {};
  for (int py = 0; py < 2; ++py)
    for (int a = 0; a < 2; ++a) {
      int64_t m = i + 1 - py - a;
      if (m < 0 || m >= s.h) continue;
      const float* dyrow = dy + ((img * 2 * s.h + 2 * m + py) * 2 * s.w) * s.f;
      for (int px = 0; px < 2; ++px)
        for (int c = 0; c < 2; ++c) {
          int64_t n0 = j0 + 1 - px - c;
          bool valid[P];
          for (int p = 0; p < P; ++p) valid[p] = !kCheck || (n0 + p >= 0 && n0 + p < s.w);
          const float* wt = kt + ((((a * 2 + c) * 2 + py) * 2 + px) * s.f) * s.c;
          for (int64_t f = 0; f < s.f; ++f) {
            v16 wv[NC];
            for (int q = 0; q < NC; ++q) wv[q] = load(wt + f * s.c + q * kLanes);
            for (int p = 0; p < P; ++p) {
              if (kCheck && !valid[p]) continue;
              v16 d = splat(dyrow[(2 * (n0 + p) + px) * s.f + f]);
              for (int q = 0; q < NC; ++q) acc[p][q] += d * wv[q];
            }
          }
        }
    }
  for (int p = 0; p < P; ++p) {
    float* out = dx + ((img * s.h + i) * s.w + j0 + p) * s.c;
    for (int q = 0; q < NC; ++q) store(out + q * kLanes, acc[p][q]);
  }
}

template <int NC>
void up_input_grad(ffi::ThreadPool& pool, const UpShape& s, const float* dy, const float* k, float* dx) {
  constexpr int P = NC == 1 ? 16 : NC == 2 ? 8 : NC == 4 ? 4 : 2;
  std::vector<float> kt(16 * s.f * s.c);  // (a, c, py, px, f, ch)
  for (int t = 0; t < 4; ++t)
    for (int64_t ch = 0; ch < s.c; ++ch)
      for (int ph = 0; ph < 4; ++ph)
        for (int64_t f = 0; f < s.f; ++f) kt[((t * 4 + ph) * s.f + f) * s.c + ch] = k[((t * s.c + ch) * 4 + ph) * s.f + f];
  const float* ktp = kt.data();
  int64_t rows = s.b * s.h;
  parallel_rows(pool, rows, [&](int64_t r) {
    int64_t img = r / s.h, i = r % s.h;
    // the first and last columns check theirs; those between run unchecked in blocks
    up_input_grad_block<NC, 1, true>(s, dy, ktp, img, i, 0, dx);
    in_blocks<P>(1, s.w - 1, [&](int64_t j, auto q) {
      up_input_grad_block<NC, decltype(q)::value, false>(s, dy, ktp, img, i, j, dx);
    });
    if (s.w > 1) up_input_grad_block<NC, 1, true>(s, dy, ktp, img, i, s.w - 1, dx);
  });
}

// dK[a, c, ch, py, px, f] = sum over img, m, n of x[m + py + a - 1, n + px + c - 1, ch]
// dy[2m + py, 2n + px, f]: per chunk of input rows, 4 channels at a time (16 NF
// accumulators; 4 / NF channels for NF vectors of f), into the chunk's partial; the partials are added in chunk order.
template <int NF>
void up_weight_grad(ffi::ThreadPool& pool, const UpShape& s, const float* x, const float* dy, float* dk) {
  constexpr int CB = 4 / NF;
  const int64_t ksize = 16 * s.c * s.f;
  int64_t rows = s.b * s.h, per = grad_rows_per_chunk(rows);
  int64_t chunks = (rows + per - 1) / per;
  std::unique_ptr<float[]> partial(new float[chunks * ksize]);  // each chunk writes all of its own
  parallel_chunks(pool, chunks, [&](int64_t chunk) {
    float* part = partial.get() + chunk * ksize;
    int64_t r0 = chunk * per, r1 = std::min(rows, (chunk + 1) * per);
    for (int py = 0; py < 2; ++py)
      for (int px = 0; px < 2; ++px)
        for (int64_t ch0 = 0; ch0 < s.c; ch0 += CB) {
          const int cb = static_cast<int>(std::min<int64_t>(CB, s.c - ch0));
          v16 acc[2][2][CB][NF] = {};
          for (int64_t r = r0; r < r1; ++r) {
            int64_t img = r / s.h, m = r % s.h;
            const float* dyrow = dy + ((img * 2 * s.h + 2 * m + py) * 2 * s.w) * s.f;
            const float* xrow[2];
            for (int a = 0; a < 2; ++a) {
              int64_t i = m + py + a - 1;
              xrow[a] = (i < 0 || i >= s.h) ? nullptr : x + ((img * s.h + i) * s.w) * s.c + ch0;
            }
            auto pixel = [&](int64_t n, bool check) {
              v16 d[NF];
              for (int q = 0; q < NF; ++q) d[q] = load(dyrow + (2 * n + px) * s.f + q * kLanes);
              for (int a = 0; a < 2; ++a) {
                if (!xrow[a]) continue;
                for (int c = 0; c < 2; ++c) {
                  int64_t col = n + px + c - 1;
                  if (check && (col < 0 || col >= s.w)) continue;
                  const float* xp = xrow[a] + col * s.c;
                  for (int e = 0; e < CB; ++e) {
                    if (e >= cb) break;
                    v16 xv = splat(xp[e]);
                    for (int q = 0; q < NF; ++q) acc[a][c][e][q] += xv * d[q];
                  }
                }
              }
            };
            if (s.w > 0) pixel(0, true);
            for (int64_t n = 1; n < s.w - 1; ++n) pixel(n, false);
            if (s.w > 1) pixel(s.w - 1, true);
          }
          for (int a = 0; a < 2; ++a)
            for (int c = 0; c < 2; ++c)
              for (int e = 0; e < cb; ++e)
                for (int q = 0; q < NF; ++q)
                  store(part + ((((a * 2 + c) * s.c + ch0 + e) * 2 + py) * 2 + px) * s.f + q * kLanes, acc[a][c][e][q]);
        }
  });
  sum_partials(partial.get(), chunks, ksize, dk);
}

// x (N, H, W, C) or dy (N, 2H, 2W, F), and K (2, 2, C, 2, 2, F): the shape, or an error.
ffi::Error up_shape(ffi::Buffer<ffi::F32>& act, bool gradient, const ffi::Span<const int64_t>& kd, UpShape* s) {
  auto ad = act.dimensions();
  if (ad.size() != 4 || kd.size() != 6 || kd[0] != 2 || kd[1] != 2 || kd[3] != 2 || kd[4] != 2)
    return ffi::Error::InvalidArgument("direct_conv up-conv: expected NHWC activations and a (2, 2, C, 2, 2, F) kernel");
  *s = {ad[0], gradient ? ad[1] / 2 : ad[1], gradient ? ad[2] / 2 : ad[2], kd[2], kd[5]};
  if (ad[3] != (gradient ? s->f : s->c) || (gradient && (ad[1] % 2 || ad[2] % 2)))
    return ffi::Error::InvalidArgument("direct_conv up-conv: activation shape does not match the kernel");
  if (!up_supported(s->c, s->f))
    return ffi::Error::InvalidArgument("direct_conv up-conv: needs C in {16, 32, 64, 128} and F in {16, 32, 64}");
  return ffi::Error::Success();
}

ffi::Error UpFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                     ffi::ResultBuffer<ffi::F32> y) {
  UpShape s;
  if (auto e = up_shape(x, false, k.dimensions(), &s); e.failure()) return e;
  const float *xp = x.typed_data(), *kp = k.typed_data();
  float* yp = y->typed_data();
  if (s.f == 16) up_forward<1>(pool, s, xp, kp, yp);
  if (s.f == 32) up_forward<2>(pool, s, xp, kp, yp);
  if (s.f == 64) up_forward<4>(pool, s, xp, kp, yp);
  return ffi::Error::Success();
}

ffi::Error UpDxImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> k,
                    ffi::ResultBuffer<ffi::F32> dx) {
  UpShape s;
  if (auto e = up_shape(dy, true, k.dimensions(), &s); e.failure()) return e;
  const float *dp = dy.typed_data(), *kp = k.typed_data();
  float* out = dx->typed_data();
  if (s.c == 16) up_input_grad<1>(pool, s, dp, kp, out);
  if (s.c == 32) up_input_grad<2>(pool, s, dp, kp, out);
  if (s.c == 64) up_input_grad<4>(pool, s, dp, kp, out);
  if (s.c == 128) up_input_grad<8>(pool, s, dp, kp, out);
  return ffi::Error::Success();
}

ffi::Error UpDwImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                    ffi::ResultBuffer<ffi::F32> dk) {
  UpShape s;
  if (auto e = up_shape(x, false, dk->dimensions(), &s); e.failure()) return e;
  auto dd = dy.dimensions();
  if (dd.size() != 4 || dd[0] != s.b || dd[1] != 2 * s.h || dd[2] != 2 * s.w || dd[3] != s.f)
    return ffi::Error::InvalidArgument("direct_conv up-conv: dy shape does not match x and the kernel");
  const float *xp = x.typed_data(), *dp = dy.typed_data();
  float* out = dk->typed_data();
  if (s.f == 16) up_weight_grad<1>(pool, s, xp, dp, out);
  if (s.f == 32) up_weight_grad<2>(pool, s, xp, dp, out);
  if (s.f == 64) up_weight_grad<4>(pool, s, xp, dp, out);
  return ffi::Error::Success();
}


// ---------------------------------------------------------------------------------
// 4x4 stride-2 'SAME' convolutions (the encoders' and discriminators'), even H and W:
//   y[oi, oj, f] = sum over a, b in 0..3 and c of x[2 oi + a - 1, 2 oj + b - 1, c] w[a, b, c, f],
// zero outside the input; C and F multiples of 16, or C of 1..4 and F of 16, 32 or 64 (the
// first convs, on images: s2_input_grad_small, and s2_weight_grad's partial channel block).

struct S2Shape {
  int64_t b, h, w, c, f;  // input N, H, W, C (output H / 2 x W / 2); output channels F
  int64_t ho() const { return h / 2; }
  int64_t wo() const { return w / 2; }
};

// P output pixels (oi, oj0 + p) of image img, f-vectors [fv0, fv0 + NFB).
template <int NFB, int P, bool kCheck>
inline void s2_forward_block(const S2Shape& s, const float* x, const float* w, int64_t img, int64_t oi,
                             int64_t oj0, int64_t fv0, float* y) {
  v16 acc[P][NFB] = {};
  for (int a = 0; a < 4; ++a) {
    int64_t i = 2 * oi + a - 1;
    if (i < 0 || i >= s.h) continue;
    for (int b = 0; b < 4; ++b) {
      int64_t col0 = 2 * oj0 + b - 1;
      const float* xc = x + ((img * s.h + i) * s.w + col0) * s.c;
      bool valid[P];
      for (int p = 0; p < P; ++p) valid[p] = !kCheck || (col0 + 2 * p >= 0 && col0 + 2 * p < s.w);
      const float* wk = w + ((a * 4 + b) * s.c) * s.f + fv0 * kLanes;
      for (int64_t c = 0; c < s.c; ++c) {
        v16 wv[NFB];
        for (int q = 0; q < NFB; ++q) wv[q] = load(wk + c * s.f + q * kLanes);
        for (int p = 0; p < P; ++p) {
          if (kCheck && !valid[p]) continue;
          v16 xv = splat(xc[2 * p * s.c + c]);
          for (int q = 0; q < NFB; ++q) acc[p][q] += xv * wv[q];
        }
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    float* yp = y + ((img * s.ho() + oi) * s.wo() + oj0 + p) * s.f + fv0 * kLanes;
    for (int q = 0; q < NFB; ++q) store(yp + q * kLanes, acc[p][q]);
  }
}

template <int NFB>
void s2_forward(ffi::ThreadPool& pool, const S2Shape& s, const float* x, const float* w, float* y) {
  constexpr int P = NFB == 1 ? 8 : NFB == 2 ? 6 : 4;
  const int64_t rows = s.b * s.ho(), wo = s.wo(), fvs = s.f / kLanes;
  parallel_rows(pool, rows, [&](int64_t r) {
    int64_t img = r / s.ho(), oi = r % s.ho();
    for (int64_t fv0 = 0; fv0 < fvs; fv0 += NFB) {
      int64_t oj = 0;
      for (; oj + P <= wo; oj += P) {
        if (oj == 0 || oj + P == wo) s2_forward_block<NFB, P, true>(s, x, w, img, oi, oj, fv0, y);
        else s2_forward_block<NFB, P, false>(s, x, w, img, oi, oj, fv0, y);
      }
      for (; oj < wo; ++oj) s2_forward_block<NFB, 1, true>(s, x, w, img, oi, oj, fv0, y);
    }
  });
}

// dx[i, j, c] = sum over the taps whose output position is inside, and f, of
// dy[oi, oj, f] w[a, b, c, f]: for i = 2s + r, a = 1 - r + 2e and oi = s + r - e
// (e in {0, 1}), and the same for columns. P input pixels of one column parity q,
// j = q + 2 (t0 + p); wt holds w as (a, b, f, c).
template <int NCB, int P, bool kCheck>
inline void s2_input_grad_block(const S2Shape& s, const float* dy, const float* wt, int64_t img, int64_t i,
                                int q, int64_t t0, int64_t cv0, float* dx) {
  v16 acc[P][NCB] = {};
  const int64_t sr = i / 2, r = i % 2;
  for (int er = 0; er < 2; ++er) {
    int64_t oi = sr + r - er;
    if (oi < 0 || oi >= s.ho()) continue;
    const int a = 1 - static_cast<int>(r) + 2 * er;
    const float* dyrow = dy + ((img * s.ho() + oi) * s.wo()) * s.f;
    for (int ec = 0; ec < 2; ++ec) {
      const int b = 1 - q + 2 * ec;
      int64_t oj0 = t0 + q - ec;
      bool valid[P];
      for (int p = 0; p < P; ++p) valid[p] = !kCheck || (oj0 + p >= 0 && oj0 + p < s.wo());
      const float* wk = wt + ((a * 4 + b) * s.f) * s.c + cv0 * kLanes;
      for (int64_t f = 0; f < s.f; ++f) {
        v16 wv[NCB];
        for (int u = 0; u < NCB; ++u) wv[u] = load(wk + f * s.c + u * kLanes);
        for (int p = 0; p < P; ++p) {
          if (kCheck && !valid[p]) continue;
          v16 d = splat(dyrow[(oj0 + p) * s.f + f]);
          for (int u = 0; u < NCB; ++u) acc[p][u] += d * wv[u];
        }
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    float* out = dx + ((img * s.h + i) * s.w + q + 2 * (t0 + p)) * s.c + cv0 * kLanes;
    for (int u = 0; u < NCB; ++u) store(out + u * kLanes, acc[p][u]);
  }
}

template <int NCB>
void s2_input_grad(ffi::ThreadPool& pool, const S2Shape& s, const float* dy, const float* w, float* dx) {
  constexpr int P = NCB == 1 ? 8 : NCB == 2 ? 6 : 4;
  std::vector<float> wt(16 * s.f * s.c);  // (a, b, f, c)
  for (int t = 0; t < 16; ++t)
    for (int64_t c = 0; c < s.c; ++c)
      for (int64_t f = 0; f < s.f; ++f) wt[(t * s.f + f) * s.c + c] = w[(t * s.c + c) * s.f + f];
  const float* wtp = wt.data();
  const int64_t rows = s.b * s.h, half = s.wo(), cvs = s.c / kLanes;
  parallel_rows(pool, rows, [&](int64_t r) {
    int64_t img = r / s.h, i = r % s.h;
    for (int64_t cv0 = 0; cv0 < cvs; cv0 += NCB)
      for (int q = 0; q < 2; ++q) {
        int64_t t = 0;
        for (; t + P <= half; t += P) {
          if (t == 0 || t + P == half) s2_input_grad_block<NCB, P, true>(s, dy, wtp, img, i, q, t, cv0, dx);
          else s2_input_grad_block<NCB, P, false>(s, dy, wtp, img, i, q, t, cv0, dx);
        }
        for (; t < half; ++t) s2_input_grad_block<NCB, 1, true>(s, dy, wtp, img, i, q, t, cv0, dx);
      }
  });
}

// dw[a, b, c, f] = sum over oi, oj of x[2 oi + a - 1, 2 oj + b - 1, c] dy[oi, oj, f]: per
// chunk of output rows, one tap row a and CB channels at a time (4 b x CB x NFB = 16
// accumulators), into the chunk's partial; the partials are added in chunk order.
// kPartial: C need not divide by CB (1..4 channels), the last block takes what is left.
template <int NFB, bool kPartial = false>
void s2_weight_grad(ffi::ThreadPool& pool, const S2Shape& s, const float* x, const float* dy, float* dw) {
  constexpr int CB = 4 / NFB;
  const int64_t ksize = 16 * s.c * s.f, rows = s.b * s.ho(), wo = s.wo(), per = grad_rows_per_chunk(rows);
  int64_t chunks = (rows + per - 1) / per;
  std::unique_ptr<float[]> partial(new float[chunks * ksize]);  // each chunk writes all of its own
  parallel_chunks(pool, chunks, [&](int64_t chunk) {
    float* part = partial.get() + chunk * ksize;
    int64_t r0 = chunk * per, r1 = std::min(rows, (chunk + 1) * per);
    for (int a = 0; a < 4; ++a)
      for (int64_t fv0 = 0; fv0 < s.f / kLanes; fv0 += NFB)
        for (int64_t c0 = 0; c0 < s.c; c0 += CB) {
          const int cb = kPartial ? static_cast<int>(std::min<int64_t>(CB, s.c - c0)) : CB;
          v16 acc[4][CB][NFB] = {};
          for (int64_t r = r0; r < r1; ++r) {
            int64_t img = r / s.ho(), oi = r % s.ho();
            int64_t i = 2 * oi + a - 1;
            if (i < 0 || i >= s.h) continue;
            const float* dyrow = dy + ((img * s.ho() + oi) * wo) * s.f + fv0 * kLanes;
            const float* xrow = x + ((img * s.h + i) * s.w) * s.c + c0;
            auto pixel = [&](int64_t oj, bool check) {
              v16 d[NFB];
              for (int q = 0; q < NFB; ++q) d[q] = load(dyrow + oj * s.f + q * kLanes);
              for (int b = 0; b < 4; ++b) {
                int64_t col = 2 * oj + b - 1;
                if (check && (col < 0 || col >= s.w)) continue;
                const float* xp = xrow + col * s.c;
                for (int e = 0; e < CB; ++e) {
                  if (kPartial && e >= cb) break;
                  v16 xv = splat(xp[e]);
                  for (int q = 0; q < NFB; ++q) acc[b][e][q] += xv * d[q];
                }
              }
            };
            if (wo > 0) pixel(0, true);
            for (int64_t oj = 1; oj < wo - 1; ++oj) pixel(oj, false);
            if (wo > 1) pixel(wo - 1, true);
          }
          for (int b = 0; b < 4; ++b)
            for (int e = 0; e < cb; ++e)
              for (int q = 0; q < NFB; ++q)
                store(part + ((a * 4 + b) * s.c + c0 + e) * s.f + (fv0 + q) * kLanes, acc[b][e][q]);
        }
  });
  sum_partials(partial.get(), chunks, ksize, dw);
}

// dx for C = 1..4 input channels (the first convs, on images; too few channels for a
// vector), in two steps per chunk of R output rows oi of one image (and the input rows
// 2 oi, 2 oi + 1 they give). First, for those rows and one more on each side, per output
// pixel o and all 16 C of its (tap, channel) pairs, t[o, a, b, c] = sum over f of dy[o, f]
// w[a, b, c, f]: vectors over (a, b, c) (C vectors), dy broadcast, P pixels sharing each
// weight load; stored as rows (oi, a, half, oj, b % 2, c) with half = b / 2, in a
// per-thread buffer that stays in cache. Then each input row i = 2 oi + a - 1 adds its
// two (oi, a) contributions: input pixel j = 2 oj + b - 1, so
// dx[i, 2 m + 1 .. 2 m + 2, :] = t[oi, a, half 1, m] + t[oi, a, half 0, m + 1], a
// contiguous sum. A halo row is computed by both chunks the same way: same values.
template <int C, int NF>
void s2_input_grad_small(ffi::ThreadPool& pool, const S2Shape& s, const float* dy, const float* w, float* dx) {
  constexpr int F = NF * kLanes, P = C == 4 ? 6 : 8;
  constexpr int64_t R = 16;
  const int64_t ho = s.ho(), wo = s.wo(), half_row = wo * 2 * C;  // floats of one (oi, a, half) row
  // wv[f * C + v]: vector v of the 16 C values (a, b, c) of output channel f
  std::vector<v16> wv(F * C);
  for (int t = 0; t < 16; ++t)
    for (int c = 0; c < C; ++c)
      for (int f = 0; f < F; ++f) wv[f * C + (t * C + c) / kLanes][(t * C + c) % kLanes] = w[(t * C + c) * F + f];
  const v16* wp = wv.data();
  auto block = [&](float* trow, const float* dyrow, int64_t oj0, auto pixels) {
    constexpr int Q = decltype(pixels)::value;
    v16 acc[Q][C] = {};
    const float* d = dyrow + oj0 * F;
    for (int f = 0; f < F; ++f) {
      v16 wf[C];
      for (int v = 0; v < C; ++v) wf[v] = wp[f * C + v];
      for (int p = 0; p < Q; ++p) {
        v16 dv = splat(d[p * F + f]);
        for (int v = 0; v < C; ++v) acc[p][v] += dv * wf[v];
      }
    }
    for (int p = 0; p < Q; ++p) {
      float vals[16 * C];
      for (int v = 0; v < C; ++v) store(vals + v * kLanes, acc[p][v]);
      for (int ah = 0; ah < 8; ++ah)  // (a, half): values (a * 4 + 2 half) * C .. + 2 C
        std::memcpy(trow + ah * half_row + (oj0 + p) * 2 * C, vals + 2 * ah * C, 2 * C * sizeof(float));
    }
  };
  const int64_t per_img = (ho + R - 1) / R;
  parallel_chunks(pool, s.b * per_img, [&](int64_t chunk) {
    const int64_t img = chunk / per_img, o0 = (chunk % per_img) * R, o1 = std::min(ho, o0 + R);
    const int64_t t0 = std::max<int64_t>(0, o0 - 1), t1 = std::min(ho, o1 + 1);
    thread_local std::vector<float> buf;
    if (buf.size() < static_cast<size_t>((t1 - t0) * 8 * half_row)) buf.resize((t1 - t0) * 8 * half_row);
    float* tp = buf.data();
    for (int64_t oi = t0; oi < t1; ++oi) {
      float* trow = tp + (oi - t0) * 8 * half_row;
      const float* dyrow = dy + (img * ho + oi) * wo * F;
      in_blocks<P>(0, wo, [&](int64_t oj, auto q) { block(trow, dyrow, oj, q); });
    }
    for (int64_t i = 2 * o0; i < 2 * o1; ++i) {
      const int64_t ri = i % 2;
      float* out = dx + (img * s.h + i) * s.w * C;
      std::fill(out, out + s.w * C, 0.f);
      for (int er = 0; er < 2; ++er) {
        const int64_t oi = i / 2 + ri - er;
        if (oi < 0 || oi >= ho) continue;
        const int a = 1 - static_cast<int>(ri) + 2 * er;
        const float* lo = tp + ((oi - t0) * 8 + a * 2) * half_row;  // b = 0, 1
        const float* hi = lo + half_row;                            // b = 2, 3
        for (int c = 0; c < C; ++c) out[c] += lo[C + c];  // pixel 0: b = 1 of oj = 0
        const int64_t n = (wo - 1) * 2 * C;
        float* mid = out + C;
        for (int64_t e = 0; e < n; ++e) mid[e] += hi[e] + lo[2 * C + e];
        for (int c = 0; c < C; ++c) out[(s.w - 1) * C + c] += hi[n + c];  // last pixel: b = 2 of the last oj
      }
    }
  });
}

// s2_input_grad_small<C, NF> for NF = F / 16 = 1, 2 or 4 (s2_supported).
template <int C>
void s2_input_grad_small_f(ffi::ThreadPool& pool, const S2Shape& s, const float* dy, const float* w, float* dx) {
  if (s.f == 16) s2_input_grad_small<C, 1>(pool, s, dy, w, dx);
  else if (s.f == 32) s2_input_grad_small<C, 2>(pool, s, dy, w, dx);
  else s2_input_grad_small<C, 4>(pool, s, dy, w, dx);
}

constexpr int64_t kMaxSmallChannels = 4;
bool s2_supported(int64_t c, int64_t f) {
  if (c > 0 && c <= kMaxSmallChannels) return f == 16 || f == 32 || f == 64;
  return c % kLanes == 0 && f % kLanes == 0 && c > 0 && f > 0;
}

// x (N, H, W, C) or dy (N, H/2, W/2, F), and w (4, 4, C, F): the shape, or an error.
ffi::Error s2_shape(ffi::Buffer<ffi::F32>& act, bool gradient, const ffi::Span<const int64_t>& wd, S2Shape* s) {
  auto ad = act.dimensions();
  if (ad.size() != 4 || wd.size() != 4 || wd[0] != 4 || wd[1] != 4)
    return ffi::Error::InvalidArgument("direct_conv strided: expected NHWC activations and a 4x4 HWIO kernel");
  *s = {ad[0], gradient ? 2 * ad[1] : ad[1], gradient ? 2 * ad[2] : ad[2], wd[2], wd[3]};
  if (ad[3] != (gradient ? s->f : s->c) || s->h % 2 || s->w % 2)
    return ffi::Error::InvalidArgument("direct_conv strided: activation shape does not match the kernel");
  if (!s2_supported(s->c, s->f))
    return ffi::Error::InvalidArgument("direct_conv strided: needs C and F multiples of 16, or C of 1..4 and F of 16, 32 or 64");
  return ffi::Error::Success();
}

ffi::Error S2FwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                     ffi::ResultBuffer<ffi::F32> y) {
  S2Shape s;
  if (auto e = s2_shape(x, false, w.dimensions(), &s); e.failure()) return e;
  const int64_t fv = s.f / kLanes;
  if (fv % 4 == 0) s2_forward<4>(pool, s, x.typed_data(), w.typed_data(), y->typed_data());
  else if (fv % 2 == 0) s2_forward<2>(pool, s, x.typed_data(), w.typed_data(), y->typed_data());
  else s2_forward<1>(pool, s, x.typed_data(), w.typed_data(), y->typed_data());
  return ffi::Error::Success();
}

ffi::Error S2DxImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                    ffi::ResultBuffer<ffi::F32> dx) {
  S2Shape s;
  if (auto e = s2_shape(dy, true, w.dimensions(), &s); e.failure()) return e;
  const int64_t cv = s.c / kLanes;
  if (s.c == 1) s2_input_grad_small_f<1>(pool, s, dy.typed_data(), w.typed_data(), dx->typed_data());
  else if (s.c == 2) s2_input_grad_small_f<2>(pool, s, dy.typed_data(), w.typed_data(), dx->typed_data());
  else if (s.c == 3) s2_input_grad_small_f<3>(pool, s, dy.typed_data(), w.typed_data(), dx->typed_data());
  else if (s.c == 4) s2_input_grad_small_f<4>(pool, s, dy.typed_data(), w.typed_data(), dx->typed_data());
  else if (cv % 4 == 0) s2_input_grad<4>(pool, s, dy.typed_data(), w.typed_data(), dx->typed_data());
  else if (cv % 2 == 0) s2_input_grad<2>(pool, s, dy.typed_data(), w.typed_data(), dx->typed_data());
  else s2_input_grad<1>(pool, s, dy.typed_data(), w.typed_data(), dx->typed_data());
  return ffi::Error::Success();
}

ffi::Error S2DwImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                    ffi::ResultBuffer<ffi::F32> dw) {
  S2Shape s;
  if (auto e = s2_shape(x, false, dw->dimensions(), &s); e.failure()) return e;
  auto dd = dy.dimensions();
  if (dd.size() != 4 || dd[0] != s.b || dd[1] != s.ho() || dd[2] != s.wo() || dd[3] != s.f)
    return ffi::Error::InvalidArgument("direct_conv strided: dy shape does not match x and the kernel");
  const int64_t fv = s.f / kLanes;
  if (s.c % kLanes) s2_weight_grad<1, true>(pool, s, x.typed_data(), dy.typed_data(), dw->typed_data());
  else if (fv % 4 == 0) s2_weight_grad<4>(pool, s, x.typed_data(), dy.typed_data(), dw->typed_data());
  else if (fv % 2 == 0) s2_weight_grad<2>(pool, s, x.typed_data(), dy.typed_data(), dw->typed_data());
  else s2_weight_grad<1>(pool, s, x.typed_data(), dy.typed_data(), dw->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SilsDirectConvFwd, FwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SilsDirectConvDx, DxImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SilsDirectConvDw, DwImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

#define SILS_UP_HANDLER(NAME, IMPL)                                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, IMPL,                           \
                                ffi::Ffi::Bind()                      \
                                    .Ctx<ffi::ThreadPool>()           \
                                    .Arg<ffi::Buffer<ffi::F32>>()     \
                                    .Arg<ffi::Buffer<ffi::F32>>()     \
                                    .Ret<ffi::Buffer<ffi::F32>>());
SILS_UP_HANDLER(SilsDirectUpConvFwd, UpFwdImpl)
SILS_UP_HANDLER(SilsDirectUpConvDx, UpDxImpl)
SILS_UP_HANDLER(SilsDirectUpConvDw, UpDwImpl)
SILS_UP_HANDLER(SilsDirectS2ConvFwd, S2FwdImpl)
SILS_UP_HANDLER(SilsDirectS2ConvDx, S2DxImpl)
SILS_UP_HANDLER(SilsDirectS2ConvDw, S2DwImpl)
