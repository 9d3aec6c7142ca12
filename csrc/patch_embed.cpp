// Fused patch embedding (LayerNorm_P -> Linear -> LayerNorm_D -> + channel/position
// embeddings), forward and backward, for CPU.
//
// Layout of the work: tokens are split into one contiguous chunk per thread and processed in
// blocks of TB tokens. Inside a block
//   H  [TB, P+1]  LayerNorm_P output with a trailing 1 (so the bias is row P of Wt),
//   Y  [TB, Dp]   H @ Wt, Wt = [weight^T; bias] of shape [P+1, Dp], transposed once per call,
// and every D-long loop runs over Dp = D rounded up to 64, with zero padding, so the register
// tiles never need a remainder along D. Explicit GCC/Clang vector types are used (AVX-512
// where the build targets it) so float reductions keep a fixed, vectorised order without
// -ffast-math.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "kernels.h"
#include "parallel.h"

#if defined(__AVX512F__)
#define CSFM_VW 16
#elif defined(__AVX__)
#define CSFM_VW 8
#else
#define CSFM_VW 4
#endif

namespace csfm {
namespace {

constexpr int VW = CSFM_VW;  // floats per vector register
typedef float vf __attribute__((vector_size(CSFM_VW * sizeof(float))));

#if CSFM_VW == 16
constexpr int JR = 4;  // vectors along D per register tile (32 registers with AVX-512)
#else
constexpr int JR = 2;  // 16 registers
#endif
constexpr int TR = 4;            // tokens per register tile
constexpr int KR = 4;            // rows of Wt per register tile
constexpr int TB = 16;           // tokens per block (buffers stay in L1/L2)
constexpr int64_t DALIGN = 64;   // Dp is a multiple of this (and of JR * VW)
static_assert(DALIGN % (JR * VW) == 0, "padding must cover a whole register tile");
static_assert(TB % TR == 0, "block must hold whole token tiles");

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(vf));
  return v;
}
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof(vf)); }
inline vf vload_part(const float* p, int64_t n) {  // n < VW floats, rest zero
  vf v = {};
  std::memcpy(&v, p, static_cast<size_t>(n) * sizeof(float));
  return v;
}
inline void vstore_part(float* p, vf v, int64_t n) {
  std::memcpy(p, &v, static_cast<size_t>(n) * sizeof(float));
}
// Pins a loaded vector in a register: without it GCC re-reads the operand from memory for
// every FMA of a register tile (folding the load into the FMA), doubling the loads.
inline void pin(vf& v) { asm("" : "+v"(v)); }

// Broadcast. x - 0.0 == x for every x (also -0.0), so this folds to a plain broadcast,
// unlike vf{} + x (-0.0 + 0.0 = +0.0) or a per-lane loop (GCC may emit lane inserts).
inline vf vset1(float x) { return x - vf{}; }
// Horizontal sum by halving with __builtin_shufflevector (GCC >= 12, Clang): no intrinsics
// (GCC 12's AVX-512 reduce intrinsics trip -Wmaybe-uninitialized) and no memcpy of the
// accumulators (taking their address keeps GCC from holding them in registers).
typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));
inline float hsum(vf v) {
#if CSFM_VW == 16
  const vf8 s8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#elif CSFM_VW == 8
  const vf8 s8 = v;
#endif
#if CSFM_VW >= 8
  const vf4 s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3) +
                 __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
#else
  const vf4 s4 = v;
#endif
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// 64-byte aligned, zero-initialised float buffer.
class FloatBuf {
 public:
  explicit FloatBuf(int64_t n) {
    size_t bytes = static_cast<size_t>(round_up(std::max<int64_t>(n, 1) * 4, 64));
    p_ = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (p_ == nullptr) throw std::bad_alloc();
    std::memset(p_, 0, bytes);
  }
  ~FloatBuf() { std::free(p_); }
  FloatBuf(const FloatBuf&) = delete;
  FloatBuf& operator=(const FloatBuf&) = delete;
  float* get() const { return p_; }

 private:
  float* p_ = nullptr;
};

// Per-call constants shared by forward and backward.
struct Prep {
  int64_t T, P, Pa, D, Dp, nvec;
  int nt;
  FloatBuf wt;   // [Pa, Dp]: wt[k][j] = weight[j][k] (k < P), wt[P][j] = bias[j]
  FloatBuf lnw;  // [Dp], zero padded
  FloatBuf lnb;  // [Dp]

  Prep(const PatchEmbedInputs& in, int n_threads)
      : T(in.T), P(in.P), Pa(in.P + 1), D(in.D), Dp(round_up(in.D, DALIGN)),
        nvec(round_up(in.D, DALIGN) / VW),
        nt(static_cast<int>(std::max<int64_t>(
            1, std::min<int64_t>(n_threads, (in.T + TB - 1) / TB)))),
        wt((in.P + 1) * round_up(in.D, DALIGN)), lnw(round_up(in.D, DALIGN)),
        lnb(round_up(in.D, DALIGN)) {
    float* w = wt.get();
    for (int64_t j = 0; j < D; ++j) {
      const float* src = in.weight + j * P;
      for (int64_t k = 0; k < P; ++k) w[k * Dp + j] = src[k];
    }
    std::memcpy(w + P * Dp, in.bias, static_cast<size_t>(D) * sizeof(float));
    std::memcpy(lnw.get(), in.ln_d_w, static_cast<size_t>(D) * sizeof(float));
    std::memcpy(lnb.get(), in.ln_d_b, static_cast<size_t>(D) * sizeof(float));
  }
};

// LayerNorm over one patch, in double. Writes h[0..P) and h[P] = 1; returns mean / rstd.
inline void layer_norm_patch(const float* x, int64_t P, const float* w, const float* b,
                             double eps, float* h, double* mean_out, double* rstd_out) {
  double s = 0.0;
  for (int64_t k = 0; k < P; ++k) s += x[k];
  const double mean = s / static_cast<double>(P);
  double v = 0.0;
  for (int64_t k = 0; k < P; ++k) {
    const double d = x[k] - mean;
    v += d * d;
  }
  const double rstd = 1.0 / std::sqrt(v / static_cast<double>(P) + eps);
  for (int64_t k = 0; k < P; ++k)
    h[k] = static_cast<float>((x[k] - mean) * rstd * w[k] + b[k]);
  h[P] = 1.0f;
  *mean_out = mean;
  *rstd_out = rstd;
}

// Y[t][0 .. JR*VW) = sum_k H[t][k] * W[k][0 .. JR*VW) for t < TR.
__attribute__((noinline)) void tile_forward(const float* H, int64_t ldh, int64_t K, const float* W, int64_t ldw,
                         float* Y, int64_t ldy) {
  vf acc[TR][JR];
#pragma GCC unroll 16
  for (int t = 0; t < TR; ++t)
#pragma GCC unroll 16
    for (int r = 0; r < JR; ++r) acc[t][r] = vf{};
  for (int64_t k = 0; k < K; ++k) {
    vf w[JR];
#pragma GCC unroll 16
    for (int r = 0; r < JR; ++r) {
      w[r] = vload(W + k * ldw + r * VW);
      pin(w[r]);
    }
#pragma GCC unroll 16
    for (int t = 0; t < TR; ++t) {
      const vf h = vset1(H[t * ldh + k]);
#pragma GCC unroll 16
      for (int r = 0; r < JR; ++r) acc[t][r] += h * w[r];
    }
  }
#pragma GCC unroll 16
  for (int t = 0; t < TR; ++t)
#pragma GCC unroll 16
    for (int r = 0; r < JR; ++r) vstore(Y + t * ldy + r * VW, acc[t][r]);
}

// Y[0..rows, 0..Dp) = H[0..rows, 0..Pa) @ Wt; rows is a multiple of TR.
void block_forward(const Prep& pp, const float* H, int64_t rows, float* Y) {
  const float* wt = pp.wt.get();
  for (int64_t j = 0; j < pp.Dp; j += JR * VW)
    for (int64_t t = 0; t < rows; t += TR)
      tile_forward(H + t * pp.Pa, pp.Pa, pp.Pa, wt + j, pp.Dp, Y + t * pp.Dp + j, pp.Dp);
}

// Mean and rstd of y[0..D) (y padded with zeros up to Dp); two-pass fp32 with vector partial
// sums. Sets the padding of y to the mean so (y - mean) vanishes there.
inline void row_stats(float* y, int64_t D, int64_t Dp, double eps, float* mean_out,
                      float* rstd_out) {
  const int64_t nvec = Dp / VW;  // multiple of 4
  vf s0 = {}, s1 = {}, s2 = {}, s3 = {};
  for (int64_t v = 0; v < nvec; v += 4) {
    s0 += vload(y + (v + 0) * VW);
    s1 += vload(y + (v + 1) * VW);
    s2 += vload(y + (v + 2) * VW);
    s3 += vload(y + (v + 3) * VW);
  }
  const float mean = hsum((s0 + s1) + (s2 + s3)) / static_cast<float>(D);
  for (int64_t j = D; j < Dp; ++j) y[j] = mean;
  const vf m = vset1(mean);
  s0 = s1 = s2 = s3 = vf{};
  for (int64_t v = 0; v < nvec; v += 4) {
    const vf d0 = vload(y + (v + 0) * VW) - m;
    const vf d1 = vload(y + (v + 1) * VW) - m;
    const vf d2 = vload(y + (v + 2) * VW) - m;
    const vf d3 = vload(y + (v + 3) * VW) - m;
    s0 += d0 * d0;
    s1 += d1 * d1;
    s2 += d2 * d2;
    s3 += d3 * d3;
  }
  const double var = static_cast<double>(hsum((s0 + s1) + (s2 + s3))) / static_cast<double>(D);
  *mean_out = mean;
  *rstd_out = static_cast<float>(1.0 / std::sqrt(var + eps));
}

// ---------------------------------------------------------------------------------------
// backward tiles
// ---------------------------------------------------------------------------------------

// GW[kr][0 .. JR*VW) += sum_{t < rows} H[t][kr] * DY[t][0 .. JR*VW) for kr < KRR.
template <int KRR>
__attribute__((noinline)) void tile_wgrad(const float* H, int64_t ldh, int64_t rows, const float* DY, int64_t ldy,
                       float* GW, int64_t ldg) {
  vf acc[KRR][JR];
#pragma GCC unroll 16
  for (int k = 0; k < KRR; ++k)
#pragma GCC unroll 16
    for (int r = 0; r < JR; ++r) acc[k][r] = vload(GW + k * ldg + r * VW);
  for (int64_t t = 0; t < rows; ++t) {
    vf d[JR];
#pragma GCC unroll 16
    for (int r = 0; r < JR; ++r) {
      d[r] = vload(DY + t * ldy + r * VW);
      pin(d[r]);
    }
#pragma GCC unroll 16
    for (int k = 0; k < KRR; ++k) {
      const vf h = vset1(H[t * ldh + k]);
#pragma GCC unroll 16
      for (int r = 0; r < JR; ++r) acc[k][r] += h * d[r];
    }
  }
#pragma GCC unroll 16
  for (int k = 0; k < KRR; ++k)
#pragma GCC unroll 16
    for (int r = 0; r < JR; ++r) vstore(GW + k * ldg + r * VW, acc[k][r]);
}

// DH[t][kr] = sum_j DY[t][j] * W[kr][j] over nvec vectors, t < TR, kr < KRR.
template <int KRR>
__attribute__((noinline)) void tile_dh(const float* DY, int64_t ldy, const float* W, int64_t ldw, int64_t nvec,
                    float* DH, int64_t lddh) {
  vf acc[TR][KRR];
#pragma GCC unroll 16
  for (int t = 0; t < TR; ++t)
#pragma GCC unroll 16
    for (int k = 0; k < KRR; ++k) acc[t][k] = vf{};
  for (int64_t v = 0; v < nvec; ++v) {
    vf w[KRR];
#pragma GCC unroll 16
    for (int k = 0; k < KRR; ++k) {
      w[k] = vload(W + k * ldw + v * VW);
      pin(w[k]);
    }
#pragma GCC unroll 16
    for (int t = 0; t < TR; ++t) {
      vf d = vload(DY + t * ldy + v * VW);
      pin(d);
#pragma GCC unroll 16
      for (int k = 0; k < KRR; ++k) acc[t][k] += d * w[k];
    }
  }
#pragma GCC unroll 16
  for (int t = 0; t < TR; ++t)
#pragma GCC unroll 16
    for (int k = 0; k < KRR; ++k) DH[t * lddh + k] = hsum(acc[t][k]);
}

// GW[0..Pa, 0..Dp) += H[0..rows)^T @ DY[0..rows)
void block_wgrad(const Prep& pp, const float* H, int64_t rows, const float* DY, float* GW) {
  const int64_t Pa = pp.Pa, Dp = pp.Dp;
  for (int64_t j = 0; j < Dp; j += JR * VW) {
    int64_t k = 0;
    for (; k + KR <= Pa; k += KR)
      tile_wgrad<KR>(H + k, Pa, rows, DY + j, Dp, GW + k * Dp + j, Dp);
    switch (Pa - k) {
      case 3: tile_wgrad<3>(H + k, Pa, rows, DY + j, Dp, GW + k * Dp + j, Dp); break;
      case 2: tile_wgrad<2>(H + k, Pa, rows, DY + j, Dp, GW + k * Dp + j, Dp); break;
      case 1: tile_wgrad<1>(H + k, Pa, rows, DY + j, Dp, GW + k * Dp + j, Dp); break;
      default: break;
    }
  }
}

// DH[0..rows, 0..P) = DY[0..rows) @ weight  (= DY @ Wt[0..P)^T); rows multiple of TR.
void block_dh(const Prep& pp, const float* DY, int64_t rows, float* DH) {
  const int64_t P = pp.P, Dp = pp.Dp, nvec = pp.nvec;
  const float* wt = pp.wt.get();
  for (int64_t t = 0; t < rows; t += TR) {
    const float* dy = DY + t * Dp;
    float* dh = DH + t * P;
    int64_t k = 0;
    for (; k + KR <= P; k += KR) tile_dh<KR>(dy, Dp, wt + k * Dp, Dp, nvec, dh + k, P);
    switch (P - k) {
      case 3: tile_dh<3>(dy, Dp, wt + k * Dp, Dp, nvec, dh + k, P); break;
      case 2: tile_dh<2>(dy, Dp, wt + k * Dp, Dp, nvec, dh + k, P); break;
      case 1: tile_dh<1>(dy, Dp, wt + k * Dp, Dp, nvec, dh + k, P); break;
      default: break;
    }
  }
}

// One vector of pass 1 of layer_norm_d_backward_row.
inline void ln_d_backward_step(float* y, vf gv, const float* lnw, float* accw, float* ac,
                               float* ap, vf m, vf r, vf& s1, vf& s2) {
  const vf zh = (vload(y) - m) * r;
  vstore(y, zh);
  const vf gw = gv * vload(lnw);
  s1 += gw;
  s2 += gw * zh;
  vstore(accw, vload(accw) + gv * zh);
  vstore(ac, vload(ac) + gv);
  vstore(ap, vload(ap) + gv);
}

// LayerNorm_D backward of one token. On entry y holds the forward pre-norm row (padded up
// to Dp) with its mean / rstd; on exit it holds dy = rstd * (gw - mean(gw) - zhat *
// mean(gw * zhat)), gw = g * ln_d_w, zero in the padding. Accumulates g * zhat into accw
// and g into the token's channel / position embedding rows ac / ap.
void layer_norm_d_backward_row(float* __restrict y, const float* __restrict go,
                               const float* __restrict lnw, float* __restrict accw,
                               float* __restrict ac, float* __restrict ap, int64_t D,
                               int64_t Dp, float mean, float rstd) {
  const vf m = vset1(mean), r = vset1(rstd);
  const int64_t dfull = D / VW * VW;  // floats of the grad_out row covered by whole vectors
  // pass 1: zhat (stored in y), sums of gw and gw * zhat, parameter accumulators
  vf s1a = {}, s1b = {}, s2a = {}, s2b = {};
  int64_t j = 0;
  for (; j + 2 * VW <= dfull; j += 2 * VW) {
    ln_d_backward_step(y + j, vload(go + j), lnw + j, accw + j, ac + j, ap + j, m, r, s1a, s2a);
    ln_d_backward_step(y + j + VW, vload(go + j + VW), lnw + j + VW, accw + j + VW,
                       ac + j + VW, ap + j + VW, m, r, s1b, s2b);
  }
  if (j < dfull) {
    ln_d_backward_step(y + j, vload(go + j), lnw + j, accw + j, ac + j, ap + j, m, r, s1a, s2a);
    j += VW;
  }
  if (j < D)
    ln_d_backward_step(y + j, vload_part(go + j, D - j), lnw + j, accw + j, ac + j, ap + j, m,
                       r, s1b, s2b);
  s1a += s1b;
  s2a += s2b;
  const float inv_d = 1.0f / static_cast<float>(D);
  const vf a = vset1(hsum(s1a) * inv_d);
  const vf b = vset1(hsum(s2a) * inv_d);
  // pass 2: dy
  for (j = 0; j < dfull; j += VW) {
    const vf gw = vload(go + j) * vload(lnw + j);
    vstore(y + j, r * (gw - a - vload(y + j) * b));
  }
  if (j < D) {
    const vf gw = vload_part(go + j, D - j) * vload(lnw + j);
    vstore(y + j, r * (gw - a - vload(y + j) * b));
  }
  if (D < Dp) std::memset(y + D, 0, static_cast<size_t>(Dp - D) * sizeof(float));
}

// Fills H for tokens [t0, t0 + nb) (rows up to round_up(nb, TR) get zeros) and returns the
// number of rows to process.
inline int64_t fill_block_h(const PatchEmbedInputs& in, const Prep& pp, int64_t t0, int64_t nb,
                            float* H, double* mean_p, double* rstd_p) {
  const int64_t rows = round_up(nb, TR);
  for (int64_t i = 0; i < nb; ++i)
    layer_norm_patch(in.patches + (t0 + i) * pp.P, pp.P, in.ln_p_w, in.ln_p_b, in.eps,
                     H + i * pp.Pa, &mean_p[i], &rstd_p[i]);
  if (rows > nb)
    std::memset(H + nb * pp.Pa, 0, static_cast<size_t>((rows - nb) * pp.Pa) * sizeof(float));
  return rows;
}

}  // namespace

// =======================================================================================
// forward
// =======================================================================================
void patch_embed_forward(const PatchEmbedInputs& in, float* out, int n_threads) {
  if (in.T <= 0 || in.D <= 0) return;
  const Prep pp(in, n_threads);
  const int64_t P = pp.P, Pa = pp.Pa, D = pp.D, Dp = pp.Dp;
  const int64_t h_stride = round_up(TB * Pa, 16);
  const int64_t y_stride = TB * Dp;
  FloatBuf hbuf(h_stride * pp.nt);
  FloatBuf ybuf(y_stride * pp.nt);
  const float* lnw = pp.lnw.get();
  const float* lnb = pp.lnb.get();
  (void)P;

  parallel_chunks(in.T, pp.nt, [&](int64_t begin, int64_t end, int worker) {
    float* H = hbuf.get() + worker * h_stride;
    float* Y = ybuf.get() + worker * y_stride;
    double mean_p[TB], rstd_p[TB];
    for (int64_t t0 = begin; t0 < end; t0 += TB) {
      const int64_t nb = std::min<int64_t>(TB, end - t0);
      const int64_t rows = fill_block_h(in, pp, t0, nb, H, mean_p, rstd_p);
      block_forward(pp, H, rows, Y);
      for (int64_t i = 0; i < nb; ++i) {
        const int64_t t = t0 + i;
        float* y = Y + i * Dp;
        float mean, rstd;
        row_stats(y, D, Dp, in.eps, &mean, &rstd);
        const float* ce = in.chan_emb + in.token_chan[t] * D;
        const float* pe = in.pos_emb + in.token_pos[t] * D;
        float* o = out + t * D;
        const vf m = vset1(mean), r = vset1(rstd);
        int64_t j = 0;
        for (; j + VW <= D; j += VW) {
          const vf z = (vload(y + j) - m) * r;
          vstore(o + j, z * vload(lnw + j) + vload(lnb + j) + vload(ce + j) + vload(pe + j));
        }
        if (j < D) {
          const int64_t n = D - j;
          const vf z = (vload(y + j) - m) * r;
          vstore_part(o + j, z * vload(lnw + j) + vload(lnb + j) + vload_part(ce + j, n) +
                                 vload_part(pe + j, n),
                      n);
        }
      }
    }
  });
}

// =======================================================================================
// backward
// =======================================================================================
void patch_embed_backward(const PatchEmbedInputs& in, const float* grad_out,
                          const PatchEmbedGrads& g, int n_threads) {
  const int64_t T = in.T, P = in.P, D = in.D, NC = in.NC, NP = in.NP;
  if (D <= 0 || P <= 0) {
    // Nothing but the per-P / per-D parameters could be non-empty; they are all zero.
    if (P > 0) {
      std::memset(g.grad_ln_p_w, 0, P * sizeof(float));
      std::memset(g.grad_ln_p_b, 0, P * sizeof(float));
      if (T > 0) std::memset(g.grad_patches, 0, T * P * sizeof(float));
    }
    return;
  }
  const Prep pp(in, n_threads);
  const int64_t Pa = pp.Pa, Dp = pp.Dp;
  const int nt = pp.nt;

  // per-thread scratch and accumulators
  const int64_t h_stride = round_up(TB * Pa, 16);
  const int64_t y_stride = TB * Dp;
  const int64_t dh_stride = round_up(TB * P, 16);
  const int64_t gw_stride = Pa * Dp;
  const int64_t emb_stride = (NC + NP) * Dp;
  const int64_t pd_stride = round_up(2 * P, 8);  // doubles: grad_ln_p_w, grad_ln_p_b
  FloatBuf hbuf(h_stride * nt), ybuf(y_stride * nt), dhbuf(dh_stride * nt);
  FloatBuf gwbuf(gw_stride * nt), lnwbuf(Dp * nt), embbuf(std::max<int64_t>(emb_stride * nt, 1));
  double* pacc = static_cast<double*>(std::calloc(static_cast<size_t>(pd_stride * nt), sizeof(double)));
  if (pacc == nullptr) throw std::bad_alloc();
  struct FreeOnExit {
    void* p;
    ~FreeOnExit() { std::free(p); }
  } free_pacc{pacc};

  const float* lnw = pp.lnw.get();

  if (T > 0) {
    parallel_chunks(T, nt, [&](int64_t begin, int64_t end, int worker) {
      float* H = hbuf.get() + worker * h_stride;
      float* Y = ybuf.get() + worker * y_stride;
      float* DH = dhbuf.get() + worker * dh_stride;
      float* GW = gwbuf.get() + worker * gw_stride;
      float* accw = lnwbuf.get() + worker * Dp;
      float* acc_chan = embbuf.get() + worker * emb_stride;
      float* acc_pos = acc_chan + NC * Dp;
      double* acc_pw = pacc + worker * pd_stride;
      double* acc_pb = acc_pw + P;
      double mean_p[TB], rstd_p[TB];

      for (int64_t t0 = begin; t0 < end; t0 += TB) {
        const int64_t nb = std::min<int64_t>(TB, end - t0);
        const int64_t rows = fill_block_h(in, pp, t0, nb, H, mean_p, rstd_p);
        block_forward(pp, H, rows, Y);

        // LayerNorm_D backward, token by token: Y[i] becomes dy (zero padded).
        for (int64_t i = 0; i < nb; ++i) {
          const int64_t t = t0 + i;
          float* y = Y + i * Dp;
          float mean, rstd;
          row_stats(y, D, Dp, in.eps, &mean, &rstd);
          layer_norm_d_backward_row(y, grad_out + t * D, lnw, accw,
                                    acc_chan + in.token_chan[t] * Dp,
                                    acc_pos + in.token_pos[t] * Dp, D, Dp, mean, rstd);
        }
        // rows [nb, rows) of Y hold H @ Wt with zero H rows, i.e. exact zeros

        block_wgrad(pp, H, rows, Y, GW);  // grad_weight^T and grad_bias (row P)
        block_dh(pp, Y, rows, DH);

        // LayerNorm_P backward
        for (int64_t i = 0; i < nb; ++i) {
          const int64_t t = t0 + i;
          const float* x = in.patches + t * P;
          const float* dh = DH + i * P;
          const double mean = mean_p[i], rstd = rstd_p[i];
          double s1 = 0.0, s2 = 0.0;
          for (int64_t k = 0; k < P; ++k) {
            const double xh = (x[k] - mean) * rstd;
            const double d = dh[k];
            acc_pw[k] += d * xh;
            acc_pb[k] += d;
            const double dw = d * static_cast<double>(in.ln_p_w[k]);
            s1 += dw;
            s2 += dw * xh;
          }
          s1 /= static_cast<double>(P);
          s2 /= static_cast<double>(P);
          float* gp = g.grad_patches + t * P;
          for (int64_t k = 0; k < P; ++k) {
            const double xh = (x[k] - mean) * rstd;
            const double dw = static_cast<double>(dh[k]) * in.ln_p_w[k];
            gp[k] = static_cast<float>(rstd * (dw - s1 - xh * s2));
          }
        }
      }
    });
  }

  // ---- deterministic reductions over workers (in worker order) ----
  // grad_weight [D, P] from GW^T, grad_bias from GW row P
  parallel_chunks(D, std::min<int>(nt, 2), [&](int64_t jb, int64_t je, int) {
    for (int64_t j = jb; j < je; ++j) {
      for (int64_t k = 0; k <= P; ++k) {
        float s = 0.0f;
        for (int w = 0; w < nt; ++w) s += gwbuf.get()[w * gw_stride + k * Dp + j];
        if (k < P)
          g.grad_weight[j * P + k] = s;
        else
          g.grad_bias[j] = s;
      }
      float s = 0.0f;
      for (int w = 0; w < nt; ++w) s += lnwbuf.get()[w * Dp + j];
      g.grad_ln_d_w[j] = s;
    }
  });
  // embedding tables, then grad_ln_d_b = sum over channels of grad_chan_emb (= sum_t g)
  parallel_chunks(NC + NP, nt, [&](int64_t rb, int64_t re, int) {
    for (int64_t row = rb; row < re; ++row) {
      float* dst = row < NC ? g.grad_chan_emb + row * D : g.grad_pos_emb + (row - NC) * D;
      const float* src0 = embbuf.get() + row * Dp;
      std::memcpy(dst, src0, static_cast<size_t>(D) * sizeof(float));
      for (int w = 1; w < nt; ++w) {
        const float* src = embbuf.get() + w * emb_stride + row * Dp;
        for (int64_t j = 0; j < D; ++j) dst[j] += src[j];
      }
    }
  });
  std::memset(g.grad_ln_d_b, 0, static_cast<size_t>(D) * sizeof(float));
  for (int64_t c = 0; c < NC; ++c) {
    const float* src = g.grad_chan_emb + c * D;
    for (int64_t j = 0; j < D; ++j) g.grad_ln_d_b[j] += src[j];
  }
  for (int64_t k = 0; k < P; ++k) {
    double sw = 0.0, sb = 0.0;
    for (int w = 0; w < nt; ++w) {
      sw += pacc[w * pd_stride + k];
      sb += pacc[w * pd_stride + P + k];
    }
    g.grad_ln_p_w[k] = static_cast<float>(sw);
    g.grad_ln_p_b[k] = static_cast<float>(sb);
  }
}

}  // namespace csfm
