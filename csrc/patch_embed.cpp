// Fused patch embedding (LayerNorm_P -> Linear -> LayerNorm_D -> + channel/position
// embeddings), forward and backward, for CPU.
//
// Per token t, with h = [LayerNorm_P(x_t); 1] (length Pa = P + 1, so the bias is one more
// column of the weight) and Wa = [weight | bias] (D x Pa):
//   y = Wa h,  out = LayerNorm_D(y) + chan_emb[c_t] + pos_emb[p_t].
// Everything runs on the column-centred weight Wc = Wa - 1 (1^T Wa) / D, for which
// Wc h = y - mean(y) exactly: so
//   zhat  = alpha Wc h,  alpha = 1 / sqrt(h^T Gc h / D + eps),  Gc = Wc^T Wc  (Pa x Pa),
// i.e. the LayerNorm_D statistics come from a Pa x Pa form in double (no pass over y, no
// cancellation), and the forward is one register-tiled matmul whose epilogue writes out.
// Backward, with g = grad_out[t], gw = g * ln_d_w, a = mean(gw), b = mean(gw * zhat):
//   dy    = alpha (gw - a - b zhat)                       (never formed)
//   u     = Wc^T gw,  s1 = sum(gw)    (one matmul: [ln_d_w * Wc | ln_d_w]^T g, Pa + 1 outputs)
//   b     = alpha (u . h) / D,  a = s1 / D
//   dh    = Wa^T dy = alpha u - alpha^2 b Gc h           (first P entries feed LayerNorm_P)
//   [grad_weight | grad_bias] = sum_t dy h^T = ln_d_w * M - 1 r^T - Wc Q, where
//     M = sum_t alpha g h^T  (D x Pa, the second matmul),
//     r = sum_t alpha a h,  Q = sum_t alpha^2 b h h^T   (Pa, Pa x Pa, in double)
//   grad_ln_d_w[j] = sum_t g zhat = sum_k Wc[j][k] M[j][k];  grad_ln_d_b = sum_t g
// So a token costs two D x Pa matmuls in the backward (g -> u and the M update) instead of
// three (recomputing y, dy^T h, W^T dy), plus one pass adding g into the embedding grads.
//
// Layout: tokens are processed in blocks of TB; the small per-token work (LayerNorm_P, the
// Pa x Pa forms) runs with the block's tokens in the lanes of double vectors. D-long rows are
// padded to Dp (a multiple of 64, zeros) so register tiles need no remainder along D.
// Explicit GCC/Clang vector types are used (AVX-512 where the build targets it), so float
// reductions keep a fixed, vectorised order without -ffast-math.
// Threads: the forward hands blocks out dynamically. The backward cuts the tokens into
// 2 * n_threads fixed segments with their own accumulators, handed out dynamically and
// summed in segment order: bitwise reproducible for a given n_threads.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include "kernels.h"
#include "memory.h"
#include "parallel.h"
#include "simd.h"

namespace csfm {
namespace {

#if CSFM_VW == 16
constexpr int JR = 4;  // vectors along D per register tile (32 registers with AVX-512)
#else
constexpr int JR = 2;  // 16 registers
#endif
constexpr int TR = 4;            // tokens per register tile
constexpr int KR = 4;            // rows of Wt per register tile
constexpr int TB = 32;           // tokens per block (buffers stay in L1/L2)
constexpr int64_t DALIGN = 64;   // Dp is a multiple of this (and of JR * VW)
static_assert(DALIGN % (JR * VW) == 0, "padding must cover a whole register tile");
static_assert(TB % TR == 0, "block must hold whole token tiles");

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

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
inline void pin(vf& v) {
#if defined(__x86_64__) || defined(__i386__)
  asm("" : "+v"(v));
#elif defined(__aarch64__)
  asm("" : "+w"(v));
#else
  (void)v;
#endif
}

// Broadcast. x - 0.0 == x for every x (also -0.0), so this folds to a plain broadcast,
// unlike vf{} + x (-0.0 + 0.0 = +0.0) or a per-lane loop (GCC may emit lane inserts).
inline vf vset1(float x) { return x - vf{}; }
// Horizontal sum by halving with __builtin_shufflevector (GCC >= 12, Clang): no intrinsics
// (GCC 12's AVX-512 reduce intrinsics trip -Wmaybe-uninitialized) and no memcpy of the
// accumulators (taking their address keeps GCC from holding them in registers). Older GCC
// adds the lanes one by one.
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define CSFM_HAVE_SHUFFLEVECTOR 1
#endif
typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));
inline float hsum(vf v) {
#if defined(CSFM_HAVE_SHUFFLEVECTOR)
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
#else
  float s = 0.0f;
  for (int i = 0; i < VW; ++i) s += v[i];
  return s;
#endif
}

#if CSFM_VW == 16 && defined(CSFM_HAVE_SHUFFLEVECTOR)
// Lane i of the result is the sum of the 16 lanes of s[i] (a transpose-and-add network).
inline vf reduce16(const vf* s) {
  vf a[8], b[4], c[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)  // [8 partial sums of s[2i] | 8 of s[2i+1]]
    a[i] = __builtin_shufflevector(s[2 * i], s[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18,
                                   19, 20, 21, 22, 23) +
           __builtin_shufflevector(s[2 * i], s[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25,
                                   26, 27, 28, 29, 30, 31);
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)  // 4 partial sums each of s[4i .. 4i+3]
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18,
                                   19, 24, 25, 26, 27) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21,
                                   22, 23, 28, 29, 30, 31);
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)  // 2 partial sums each of s[8i .. 8i+7]
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20,
                                   21, 24, 25, 28, 29) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19,
                                   22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                 28, 30) +
         __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27,
                                 29, 31);
}
#endif

// 64-byte aligned float buffer, zero-initialised unless zero == false.
class FloatBuf {
 public:
  explicit FloatBuf(int64_t n, bool zero = true) {
    size_t bytes = static_cast<size_t>(round_up(std::max<int64_t>(n, 1) * 4, 64));
    p_ = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (p_ == nullptr) throw std::bad_alloc();
    if (zero) std::memset(p_, 0, bytes);
  }
  ~FloatBuf() { std::free(p_); }
  FloatBuf(const FloatBuf&) = delete;
  FloatBuf& operator=(const FloatBuf&) = delete;
  float* get() const { return p_; }

 private:
  float* p_ = nullptr;
};

// Double vectors of 8 (token lanes in the per-block work, partial sums in Prep).
typedef double vd __attribute__((vector_size(8 * sizeof(double))));
constexpr int TBV = TB / 8;  // double vectors per block row
static_assert(TB % 8 == 0, "token lanes come in vectors of 8");

inline vd vdload(const double* p) {
  vd v;
  std::memcpy(&v, p, sizeof(vd));
  return v;
}
inline void vdstore(double* p, vd v) { std::memcpy(p, &v, sizeof(vd)); }
inline vd vdset1(double x) { return x - vd{}; }

// Per-call constants shared by forward and backward.
struct Prep {
  int64_t P, Pa, D, Dp;
  int nt;  // forward threads: n_threads, at most one per block
  FloatBuf wct;  // [Pa, Dp]: wct[k][j] = Wc[j][k] (centred [weight | bias], transposed)
  FloatBuf lnw;  // [Dp], zero padded
  FloatBuf lnb;  // [Dp]
  std::vector<double> gc;  // [round_up(Pa, 4), Pa]: Wc^T Wc (of the float wct), zero rows
                           // past Pa

  Prep(const PatchEmbedInputs& in, int n_threads)
      : P(in.P), Pa(in.P + 1), D(in.D), Dp(round_up(in.D, DALIGN)),
        nt(static_cast<int>(std::max<int64_t>(
            1, std::min<int64_t>(n_threads, (in.T + TB - 1) / TB)))),
        wct((in.P + 1) * round_up(in.D, DALIGN)), lnw(round_up(in.D, DALIGN)),
        lnb(round_up(in.D, DALIGN)),
        gc(static_cast<size_t>(round_up(in.P + 1, 4) * (in.P + 1)), 0.0) {
    // column means of [weight | bias] over the D features, in double
    std::vector<double> colmean(static_cast<size_t>(Pa), 0.0);
    for (int64_t j = 0; j < D; ++j) {
      const float* row = in.weight + j * P;
      for (int64_t k = 0; k < P; ++k) colmean[k] += row[k];
      colmean[P] += in.bias[j];
    }
    for (auto& c : colmean) c /= static_cast<double>(D);
    float* w = wct.get();
    for (int64_t j = 0; j < D; ++j) {
      const float* row = in.weight + j * P;
      for (int64_t k = 0; k < P; ++k) w[k * Dp + j] = static_cast<float>(row[k] - colmean[k]);
      w[P * Dp + j] = static_cast<float>(in.bias[j] - colmean[P]);
    }
    // Gc = Wc^T Wc in double: rows of wct widened once, then 4-way vector partial sums
    // (rows are zero padded to Dp, a multiple of 64, so whole vectors of 8 cover them)
    std::vector<double> wd(static_cast<size_t>(Pa * Dp));
    for (int64_t i = 0; i < Pa * Dp; ++i) wd[i] = w[i];
    for (int64_t k1 = 0; k1 < Pa; ++k1) {
      for (int64_t k2 = k1; k2 < Pa; ++k2) {
        const double* a = wd.data() + k1 * Dp;
        const double* b = wd.data() + k2 * Dp;
        vd s0 = {}, s1 = {}, s2 = {}, s3 = {};
        for (int64_t j = 0; j < Dp; j += 32) {
          s0 += vdload(a + j) * vdload(b + j);
          s1 += vdload(a + j + 8) * vdload(b + j + 8);
          s2 += vdload(a + j + 16) * vdload(b + j + 16);
          s3 += vdload(a + j + 24) * vdload(b + j + 24);
        }
        const vd t = (s0 + s1) + (s2 + s3);
        double sum = 0.0;
        for (int l = 0; l < 8; ++l) sum += t[l];
        gc[k1 * Pa + k2] = gc[k2 * Pa + k1] = sum;
      }
    }
    std::memcpy(lnw.get(), in.ln_d_w, static_cast<size_t>(D) * sizeof(float));
    std::memcpy(lnb.get(), in.ln_d_b, static_cast<size_t>(D) * sizeof(float));
  }
};

// ---------------------------------------------------------------------------------------
// Per-block small work, with the block's TB tokens in the lanes of double vectors
// ---------------------------------------------------------------------------------------
// Per-worker block scratch, all [rows][TB] with token i in lane i.
struct BlockScratch {
  double* xt;  // [P, TB]   patches (0 in lanes >= nb)
  double* ht;  // [Pa4, TB] h = [LayerNorm_P(x); 1] as the float H holds it (0 lanes >= nb)
  double* vt;  // [Pa4, TB] Gc h
  double* dt;  // [P, TB]   dL/dh (backward)
  alignas(64) double mean_p[TB];
  alignas(64) double rstd_p[TB];
  alignas(64) double alpha[TB];  // 1 / std of y (1 / sqrt(eps) in lanes >= nb)

  static int64_t doubles(int64_t P, int64_t Pa) { return TB * (2 * P + 2 * round_up(Pa, 4)); }
  void bind(double* base, int64_t P, int64_t Pa) {
    xt = base;
    ht = xt + P * TB;
    vt = ht + round_up(Pa, 4) * TB;
    dt = vt + round_up(Pa, 4) * TB;
  }
};

// For tokens [t0, t0 + nb): LayerNorm_P in double, H [rows, Pa] (float, rows = nb rounded
// up to TR, padding rows zero) and the LayerNorm_D statistics of y = Wa h from h alone:
// vt = Gc h, alpha = 1 / sqrt(h^T Gc h / D + eps). Returns rows.
int64_t block_front(const PatchEmbedInputs& in, const Prep& pp, int64_t t0, int64_t nb,
                    float* H, BlockScratch& s) {
  const int64_t P = pp.P, Pa = pp.Pa, Pa4 = round_up(Pa, 4);
  const float* x = in.patches + t0 * P;
  for (int64_t i = 0; i < nb; ++i)
    for (int64_t k = 0; k < P; ++k) s.xt[k * TB + i] = x[i * P + k];
  for (int64_t k = 0; k < P; ++k)
    for (int64_t i = nb; i < TB; ++i) s.xt[k * TB + i] = 0.0;

  const vd inv_p = vdset1(1.0 / static_cast<double>(P));
  vd mean[TBV], rstd[TBV];
  for (int v = 0; v < TBV; ++v) {
    vd sum = {};
    for (int64_t k = 0; k < P; ++k) sum += vdload(s.xt + k * TB + 8 * v);
    mean[v] = sum * inv_p;
    vd sq = {};
    for (int64_t k = 0; k < P; ++k) {
      const vd d = vdload(s.xt + k * TB + 8 * v) - mean[v];
      sq += d * d;
    }
    sq *= inv_p;
    for (int l = 0; l < 8; ++l) rstd[v][l] = 1.0 / std::sqrt(sq[l] + in.eps);
    vdstore(s.mean_p + 8 * v, mean[v]);
    vdstore(s.rstd_p + 8 * v, rstd[v]);
  }
  for (int64_t k = 0; k < P; ++k) {
    const vd w = vdset1(in.ln_p_w[k]), b = vdset1(in.ln_p_b[k]);
    for (int v = 0; v < TBV; ++v) {
      const vd h = (vdload(s.xt + k * TB + 8 * v) - mean[v]) * rstd[v] * w + b;
      // rounded to float, as the tiles see it
      vdstore(s.ht + k * TB + 8 * v, __builtin_convertvector(__builtin_convertvector(h, vf8), vd));
    }
    for (int64_t i = 0; i < nb; ++i) H[i * Pa + k] = static_cast<float>(s.ht[k * TB + i]);
    for (int64_t i = nb; i < TB; ++i) s.ht[k * TB + i] = 0.0;
  }
  for (int64_t i = 0; i < TB; ++i) {
    s.ht[P * TB + i] = i < nb ? 1.0 : 0.0;
    for (int64_t k = Pa; k < Pa4; ++k) s.ht[k * TB + i] = 0.0;
  }
  for (int64_t i = 0; i < nb; ++i) H[i * Pa + P] = 1.0f;
  const int64_t rows = round_up(nb, TR);
  if (rows > nb)
    std::memset(H + nb * Pa, 0, static_cast<size_t>((rows - nb) * Pa) * sizeof(float));

  // vt = Gc ht, four rows of Gc at a time (Gc is zero padded to Pa4 rows)
  const double* gc = pp.gc.data();
  for (int64_t k = 0; k < Pa4; k += 4) {
    vd acc[4][TBV];
#pragma GCC unroll 4
    for (int kk = 0; kk < 4; ++kk)
#pragma GCC unroll 4
      for (int v = 0; v < TBV; ++v) acc[kk][v] = vd{};
    for (int64_t k2 = 0; k2 < Pa; ++k2) {
      vd h[TBV];
#pragma GCC unroll 4
      for (int v = 0; v < TBV; ++v) h[v] = vdload(s.ht + k2 * TB + 8 * v);
#pragma GCC unroll 4
      for (int kk = 0; kk < 4; ++kk) {
        const vd g = vdset1(gc[(k + kk) * Pa + k2]);
#pragma GCC unroll 4
        for (int v = 0; v < TBV; ++v) acc[kk][v] += g * h[v];
      }
    }
#pragma GCC unroll 4
    for (int kk = 0; kk < 4; ++kk)
#pragma GCC unroll 4
      for (int v = 0; v < TBV; ++v) vdstore(s.vt + (k + kk) * TB + 8 * v, acc[kk][v]);
  }
  const vd inv_d = vdset1(1.0 / static_cast<double>(pp.D));
  for (int v = 0; v < TBV; ++v) {
    vd e2 = {};
    for (int64_t k = 0; k < Pa; ++k)
      e2 += vdload(s.ht + k * TB + 8 * v) * vdload(s.vt + k * TB + 8 * v);
    e2 *= inv_d;
    for (int l = 0; l < 8; ++l)
      s.alpha[8 * v + l] = 1.0 / std::sqrt(std::max(e2[l], 0.0) + in.eps);
  }
  return rows;
}

// LayerNorm_P backward of the block from s.dt (zero in lanes >= nb): writes grad_patches rows
// [t0, t0 + nb) and adds into the per-lane parameter accumulators pw, pb ([P, TB] each).
void block_lnp_backward(const PatchEmbedInputs& in, const Prep& pp, int64_t t0, int64_t nb,
                        const BlockScratch& s, double* pw, double* pb, float* grad_patches) {
  const int64_t P = pp.P;
  const vd inv_p = vdset1(1.0 / static_cast<double>(P));
  for (int v = 0; v < TBV; ++v) {
    const vd mean = vdload(s.mean_p + 8 * v), rstd = vdload(s.rstd_p + 8 * v);
    vd s1 = {}, s2 = {};
    for (int64_t k = 0; k < P; ++k) {
      const vd xh = (vdload(s.xt + k * TB + 8 * v) - mean) * rstd;
      const vd d = vdload(s.dt + k * TB + 8 * v);
      vdstore(pw + k * TB + 8 * v, vdload(pw + k * TB + 8 * v) + d * xh);
      vdstore(pb + k * TB + 8 * v, vdload(pb + k * TB + 8 * v) + d);
      const vd dw = d * vdset1(in.ln_p_w[k]);
      s1 += dw;
      s2 += dw * xh;
    }
    s1 *= inv_p;
    s2 *= inv_p;
    double gp[8];
    const int64_t lanes = std::min<int64_t>(8, nb - 8 * v);
    for (int64_t k = 0; k < P; ++k) {
      const vd xh = (vdload(s.xt + k * TB + 8 * v) - mean) * rstd;
      const vd dw = vdload(s.dt + k * TB + 8 * v) * vdset1(in.ln_p_w[k]);
      vdstore(gp, rstd * (dw - s1 - xh * s2));
      for (int64_t l = 0; l < lanes; ++l)
        grad_patches[(t0 + 8 * v + l) * P + k] = static_cast<float>(gp[l]);
    }
  }
}

// The register tiles are kept out of line: one call covers hundreds of FMAs, and GCC then
// allocates their accumulators to registers independently of the caller.

// Y[t][0 .. JR*VW) = sum_k H[t][k] * W[k][0 .. JR*VW) for t < TR.
__attribute__((noinline)) void tile_forward(const float* H, int64_t ldh, int64_t K,
                                            const float* W, int64_t ldw, float* Y,
                                            int64_t ldy) {
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

// Where a forward tile writes its TR tokens.
struct OutRows {
  float* o[TR];          // out row of each token (nullptr: padding token, not written)
  const float* ce[TR];   // chan_emb row
  const float* pe[TR];   // pos_emb row
  float alpha[TR];       // 1 / std of the token's y
};

// out[t][j + c] = alpha_t * Y[t][c] * lnw[j + c] + lnb[j + c] + ce_t[j + c] + pe_t[j + c]
// for c < ncols (<= JR * VW), Y a [TR, JR * VW] tile. stream: whole vectors go out with
// non-temporal stores (rows vector aligned).
void tile_forward_epilogue(const float* __restrict Y, const OutRows& rows,
                           const float* __restrict lnw, const float* __restrict lnb, int64_t j,
                           int64_t ncols, bool stream) {
  constexpr int64_t W = JR * VW;
  for (int t = 0; t < TR; ++t) {
    float* __restrict o = rows.o[t];
    if (o == nullptr) continue;
    o += j;
    const float* __restrict ce = rows.ce[t] + j;
    const float* __restrict pe = rows.pe[t] + j;
    const float* y = Y + t * W;
    const vf a = vset1(rows.alpha[t]);
    int64_t c = 0;
    if (stream) {
      for (; c + VW <= ncols; c += VW)
        vstream(o + c, (vload(y + c) * a) * vload(lnw + j + c) + vload(lnb + j + c) +
                           vload(ce + c) + vload(pe + c));
    }
    for (; c + VW <= ncols; c += VW)
      vstore(o + c, (vload(y + c) * a) * vload(lnw + j + c) + vload(lnb + j + c) +
                        vload(ce + c) + vload(pe + c));
    if (c < ncols) {
      const int64_t n = ncols - c;
      vstore_part(o + c,
                  (vload(y + c) * a) * vload(lnw + j + c) + vload(lnb + j + c) +
                      vload_part(ce + c, n) + vload_part(pe + c, n),
                  n);
    }
  }
}

// GW[kr][0 .. JR*VW) += sum_{t < rows} H[t][kr] * DY[t][0 .. JR*VW) for kr < KRR.
template <int KRR>
__attribute__((noinline)) void tile_wgrad(const float* H, int64_t ldh, int64_t rows,
                                          const float* DY, int64_t ldy, float* GW,
                                          int64_t ldg) {
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
__attribute__((noinline)) void tile_dot(const float* DY, int64_t ldy, const float* W,
                                        int64_t ldw, int64_t nvec, float* DH, int64_t lddh) {
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
#if CSFM_VW == 16 && defined(CSFM_HAVE_SHUFFLEVECTOR)
  if constexpr (TR * KRR == 16) {
    // the 16 horizontal sums at once (15 shuffle-add steps instead of 16 separate hsums)
    vf s[16];
#pragma GCC unroll 16
    for (int t = 0; t < TR; ++t)
#pragma GCC unroll 16
      for (int k = 0; k < KRR; ++k) s[t * KRR + k] = acc[t][k];
    const vf red = reduce16(s);
    alignas(64) float out[16];
    vstore(out, red);
    for (int t = 0; t < TR; ++t)
      for (int k = 0; k < KRR; ++k) DH[t * lddh + k] = out[t * KRR + k];
    return;
  }
#endif
#pragma GCC unroll 16
  for (int t = 0; t < TR; ++t)
#pragma GCC unroll 16
    for (int k = 0; k < KRR; ++k) DH[t * lddh + k] = hsum(acc[t][k]);
}

// GW[0..K, 0..Dp) += H[0..rows, 0..K)^T @ G[0..rows, 0..Dp)   (ldh = K, ldg = ld of GW = Dp)
void block_wgrad(const float* H, int64_t K, int64_t rows, const float* G, int64_t Dp,
                 float* GW) {
  for (int64_t j = 0; j < Dp; j += JR * VW) {
    int64_t k = 0;
    for (; k + KR <= K; k += KR) tile_wgrad<KR>(H + k, K, rows, G + j, Dp, GW + k * Dp + j, Dp);
    switch (K - k) {
      case 3: tile_wgrad<3>(H + k, K, rows, G + j, Dp, GW + k * Dp + j, Dp); break;
      case 2: tile_wgrad<2>(H + k, K, rows, G + j, Dp, GW + k * Dp + j, Dp); break;
      case 1: tile_wgrad<1>(H + k, K, rows, G + j, Dp, GW + k * Dp + j, Dp); break;
      default: break;
    }
  }
}

// U[0..rows, 0..K) = G[0..rows) @ W[0..K)^T (W rows of length Dp); rows multiple of TR.
void block_dot(const float* G, int64_t rows, const float* W, int64_t K, int64_t Dp,
               float* U) {
  const int64_t nvec = Dp / VW;
  for (int64_t t = 0; t < rows; t += TR) {
    const float* g = G + t * Dp;
    float* u = U + t * K;
    int64_t k = 0;
    for (; k + KR <= K; k += KR) tile_dot<KR>(g, Dp, W + k * Dp, Dp, nvec, u + k, K);
    switch (K - k) {
      case 3: tile_dot<3>(g, Dp, W + k * Dp, Dp, nvec, u + k, K); break;
      case 2: tile_dot<2>(g, Dp, W + k * Dp, Dp, nvec, u + k, K); break;
      case 1: tile_dot<1>(g, Dp, W + k * Dp, Dp, nvec, u + k, K); break;
      default: break;
    }
  }
}

// Asks for a row of n floats to be brought towards L2 (grad_out streams from L3 / DRAM).
inline void prefetch_row(const float* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(float)); off += 64)
    __builtin_prefetch(c + off, 0, 2);
}

// Copies g (D floats) into the zero-padded row gp (Dp floats) and adds it into the token's
// channel / position embedding gradient rows ac / ap (Dp floats).
void take_grad_row(const float* __restrict g, float* __restrict gp, float* __restrict ac,
                   float* __restrict ap, int64_t D, int64_t Dp) {
  int64_t j = 0;
  for (; j + VW <= D; j += VW) {
    const vf v = vload(g + j);
    vstore(gp + j, v);
    vstore(ac + j, vload(ac + j) + v);
    vstore(ap + j, vload(ap + j) + v);
  }
  if (j < D) {
    const vf v = vload_part(g + j, D - j);
    vstore(gp + j, v);
    vstore(ac + j, vload(ac + j) + v);
    vstore(ap + j, vload(ap + j) + v);
    j += VW;
  }
  if (j < Dp) std::memset(gp + j, 0, static_cast<size_t>(Dp - j) * sizeof(float));
}

}  // namespace

// =======================================================================================
// forward
// =======================================================================================
void patch_embed_forward(const PatchEmbedInputs& in, float* out, int n_threads) {
  if (in.T <= 0 || in.D <= 0 || in.P <= 0) return;
  advise_huge_pages(out, static_cast<size_t>(in.T * in.D) * sizeof(float));
  const Prep pp(in, n_threads);
  const int64_t Pa = pp.Pa, D = pp.D, Dp = pp.Dp;
  const int64_t h_stride = round_up(TB * Pa, 16);
  FloatBuf hbuf(h_stride * pp.nt, false);  // fully written before being read
  const int64_t s_stride = BlockScratch::doubles(pp.P, Pa);
  std::vector<double> sbuf(static_cast<size_t>(s_stride * pp.nt));
  const float* lnw = pp.lnw.get();
  const float* lnb = pp.lnb.get();
  const float* wct = pp.wct.get();
  // A large output (beyond what the caches keep anyway) is written with non-temporal stores:
  // it saves reading every line of `out` before overwriting it. Needs vector-aligned rows.
  const bool stream = use_streaming_stores(out, in.T, D);

  // Blocks of TB tokens are handed out dynamically (a thread slowed down by other load on
  // its core just takes fewer); every output element is written by exactly one block.
  const int64_t n_blocks = (in.T + TB - 1) / TB;
  std::atomic<int64_t> next_block{0};
  parallel_chunks(pp.nt, pp.nt, [&](int64_t, int64_t, int worker) {
    float* H = hbuf.get() + worker * h_stride;
    BlockScratch bs;
    bs.bind(sbuf.data() + worker * s_stride, pp.P, Pa);
    alignas(64) float ytile[TR * JR * VW];
    for (int64_t blk = next_block.fetch_add(1, std::memory_order_relaxed); blk < n_blocks;
         blk = next_block.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t t0 = blk * TB;
      const int64_t nb = std::min<int64_t>(TB, in.T - t0);
      const int64_t rows = block_front(in, pp, t0, nb, H, bs);
      OutRows orow[TB / TR];
      for (int64_t tg = 0; tg < rows; tg += TR) {
        OutRows& o = orow[tg / TR];
        for (int r = 0; r < TR; ++r) {
          const int64_t i = tg + r;
          if (i < nb) {
            const int64_t t = t0 + i;
            o.o[r] = out + t * D;
            o.ce[r] = in.chan_emb + in.token_chan[t] * D;
            o.pe[r] = in.pos_emb + in.token_pos[t] * D;
            o.alpha[r] = static_cast<float>(bs.alpha[i]);
          } else {
            o.o[r] = nullptr;
            o.ce[r] = o.pe[r] = nullptr;
            o.alpha[r] = 0.0f;
          }
        }
      }
      // columns outer, so the [Pa, 64] slice of wct stays in L1 across the block's tokens
      for (int64_t j = 0; j < D; j += JR * VW) {
        const int64_t ncols = std::min<int64_t>(JR * VW, D - j);
        for (int64_t tg = 0; tg < rows; tg += TR) {
          tile_forward(H + tg * Pa, Pa, Pa, wct + j, Dp, ytile, JR * VW);
          tile_forward_epilogue(ytile, orow[tg / TR], lnw, lnb, j, ncols, stream);
        }
      }
    }
    if (stream) stream_fence();
  });
}

// =======================================================================================
// backward
// =======================================================================================
void patch_embed_backward(const PatchEmbedInputs& in, const float* grad_out,
                          const PatchEmbedGrads& g, int n_threads) {
  const int64_t T = in.T, P = in.P, D = in.D, NC = in.NC, NP = in.NP;
  if (D <= 0 || P <= 0) return;  // rejected by the bindings: LayerNorm over nothing
  if (D == 1) {
    // LayerNorm over a single feature outputs ln_d_b whatever its input: every gradient
    // upstream of it is exactly zero (the general path would return rounding noise scaled
    // by 1 / sqrt(eps) instead).
    std::memset(g.grad_patches, 0, static_cast<size_t>(T * P) * sizeof(float));
    std::memset(g.grad_ln_p_w, 0, static_cast<size_t>(P) * sizeof(float));
    std::memset(g.grad_ln_p_b, 0, static_cast<size_t>(P) * sizeof(float));
    std::memset(g.grad_weight, 0, static_cast<size_t>(P) * sizeof(float));
    g.grad_bias[0] = 0.0f;
    g.grad_ln_d_w[0] = 0.0f;
    std::memset(g.grad_chan_emb, 0, static_cast<size_t>(NC) * sizeof(float));
    std::memset(g.grad_pos_emb, 0, static_cast<size_t>(NP) * sizeof(float));
    double sum = 0.0;
    for (int64_t t = 0; t < T; ++t) {
      g.grad_chan_emb[in.token_chan[t]] += grad_out[t];
      g.grad_pos_emb[in.token_pos[t]] += grad_out[t];
      sum += grad_out[t];
    }
    g.grad_ln_d_b[0] = static_cast<float>(sum);
    return;
  }
  const Prep pp(in, n_threads);
  const int64_t Pa = pp.Pa, Dp = pp.Dp, Ku = pp.Pa + 1;
  const double inv_d = 1.0 / static_cast<double>(D);
  // per-segment accumulators (zeroed by the thread that runs the segment): M^T [Pa, Dp],
  // embedding rows [NC + NP, Dp]; doubles: Q [Pa, Pa, 8 lanes], r [Pa, 8 lanes],
  // grad_ln_p_w and grad_ln_p_b [P, TB lanes] each
  const int64_t m_stride = Pa * Dp;
  const int64_t emb_stride = (NC + NP) * Dp;
  const int64_t acc_doubles = 8 * (Pa * Pa + Pa) + 2 * P * TB;
  const int64_t seg_bytes = (m_stride + emb_stride) * 4 + acc_doubles * 8;
  // The tokens are cut into n_seg fixed segments (whole blocks), each with its own
  // accumulators; threads take segments as they become free, and the segments' partial sums
  // are added in segment order, so the result does not depend on which thread ran what.
  // 2 segments per thread (so a thread slowed by other load can hand work over), fewer when
  // the accumulators would pass ~64 MiB (large embedding tables), never fewer than threads.
  const int64_t n_blocks = (T + TB - 1) / TB;
  const int64_t n_thr = std::max(n_threads, 1);
  const int64_t seg_cap = std::max<int64_t>(n_thr, (int64_t{64} << 20) / seg_bytes);
  const int64_t n_seg = std::min<int64_t>(n_blocks, std::min<int64_t>(2 * n_thr, seg_cap));
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_thr, n_seg)));

  // W3 = [ln_d_w * Wc | ln_d_w]^T, [Pa + 1, Dp]: g -> (u = Wc^T gw, s1 = sum gw)
  FloatBuf w3(Ku * Dp);
  for (int64_t k = 0; k < Pa; ++k)
    for (int64_t j = 0; j < D; ++j)
      w3.get()[k * Dp + j] = pp.lnw.get()[j] * pp.wct.get()[k * Dp + j];
  std::memcpy(w3.get() + Pa * Dp, in.ln_d_w, static_cast<size_t>(D) * sizeof(float));

  // per-worker scratch (written before read)
  const int64_t h_stride = round_up(TB * Pa, 16);
  const int64_t g_stride = TB * Dp;
  const int64_t u_stride = round_up(TB * Ku, 16);
  const int64_t s_stride = BlockScratch::doubles(P, Pa);
  FloatBuf hbuf(h_stride * nt, false), hsbuf(h_stride * nt, false), gbuf(g_stride * nt, false);
  FloatBuf ubuf(u_stride * nt, false);
  std::vector<double> sbuf(static_cast<size_t>(s_stride * nt));
  FloatBuf mbuf(std::max<int64_t>(m_stride * n_seg, 1), false);
  FloatBuf embbuf(std::max<int64_t>(emb_stride * n_seg, 1), false);
  std::vector<double> dbuf(static_cast<size_t>(std::max<int64_t>(acc_doubles * n_seg, 1)));
  const float* w3p = w3.get();

  std::atomic<int64_t> next_seg{0};
  parallel_chunks(nt, nt, [&](int64_t, int64_t, int worker) {
    float* H = hbuf.get() + worker * h_stride;    // [TB, Pa]  h
    float* Hs = hsbuf.get() + worker * h_stride;  // [TB, Pa]  alpha * h
    float* G = gbuf.get() + worker * g_stride;    // [TB, Dp]  grad_out rows, padded
    float* U = ubuf.get() + worker * u_stride;    // [TB, Pa + 1]  (u, s1)
    BlockScratch bs;
    bs.bind(sbuf.data() + worker * s_stride, P, Pa);
    alignas(64) double q_lane[TB], r_lane[TB];  // alpha^2 b and alpha a of each token
    for (int64_t seg = next_seg.fetch_add(1, std::memory_order_relaxed); seg < n_seg;
         seg = next_seg.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t begin = std::min(T, seg * n_blocks / n_seg * TB);
      const int64_t end = std::min(T, (seg + 1) * n_blocks / n_seg * TB);
      float* M = mbuf.get() + seg * m_stride;
      float* acc_chan = embbuf.get() + seg * emb_stride;
      float* acc_pos = acc_chan + NC * Dp;
      double* Q = dbuf.data() + seg * acc_doubles;  // [Pa, Pa, 8 lanes]
      double* r = Q + 8 * Pa * Pa;                   // [Pa, 8 lanes]
      double* pw = r + 8 * Pa;                       // [P, TB]
      double* pb = pw + P * TB;                      // [P, TB]
      std::memset(M, 0, static_cast<size_t>(m_stride) * sizeof(float));
      std::memset(acc_chan, 0, static_cast<size_t>(emb_stride) * sizeof(float));
      std::fill(Q, Q + acc_doubles, 0.0);

      for (int64_t t0 = begin; t0 < end; t0 += TB) {
        const int64_t nb = std::min<int64_t>(TB, end - t0);
        const int64_t rows = block_front(in, pp, t0, nb, H, bs);
        for (int64_t i = 0; i < nb; ++i) {
          const int64_t t = t0 + i;
          const float a = static_cast<float>(bs.alpha[i]);
          for (int64_t k = 0; k < Pa; ++k) Hs[i * Pa + k] = a * H[i * Pa + k];
          if (t + TB < end) prefetch_row(grad_out + (t + TB) * D, D);  // next block's row
          take_grad_row(grad_out + t * D, G + i * Dp, acc_chan + in.token_chan[t] * Dp,
                        acc_pos + in.token_pos[t] * Dp, D, Dp);
        }
        if (rows > nb) {  // padding tokens: zero rows, so they add nothing below
          std::memset(Hs + nb * Pa, 0, static_cast<size_t>((rows - nb) * Pa) * sizeof(float));
          std::memset(G + nb * Dp, 0, static_cast<size_t>((rows - nb) * Dp) * sizeof(float));
        }

        block_dot(G, rows, w3p, Ku, Dp, U);   // U[i] = (Wc^T gw, sum gw)
        block_wgrad(Hs, Pa, rows, G, Dp, M);  // M^T += (alpha h)^T g

        for (int64_t i = 0; i < nb; ++i) {
          const float* h = H + i * Pa;
          const float* u = U + i * Ku;
          const double al = bs.alpha[i];
          double c0 = 0.0, c1 = 0.0;
          int64_t k = 0;
          for (; k + 1 < Pa; k += 2) {
            c0 += static_cast<double>(u[k]) * h[k];
            c1 += static_cast<double>(u[k + 1]) * h[k + 1];
          }
          if (k < Pa) c0 += static_cast<double>(u[k]) * h[k];
          const double a = u[Pa] * inv_d;          // mean(gw)
          const double b = al * (c0 + c1) * inv_d;  // mean(gw * zhat)
          const double q = al * al * b;
          // dh = alpha u - alpha^2 b Gc h
          for (k = 0; k < P; ++k) bs.dt[k * TB + i] = al * u[k] - q * bs.vt[k * TB + i];
          q_lane[i] = q;
          r_lane[i] = al * a;
        }
        for (int64_t i = nb; i < TB; ++i) q_lane[i] = r_lane[i] = 0.0;
        for (int64_t k = 0; k < P; ++k)
          for (int64_t i = nb; i < TB; ++i) bs.dt[k * TB + i] = 0.0;
        // r += sum_i alpha a h_i,  Q += sum_i alpha^2 b h_i h_i^T (upper triangle, mirrored
        // at the end), kept per lane (8 partial sums each) and reduced in lane order at the end
        for (int64_t k1 = 0; k1 < Pa; ++k1) {
          vd qh[TBV], rsum = vdload(r + 8 * k1);
#pragma GCC unroll 4
          for (int v = 0; v < TBV; ++v) {
            const vd h = vdload(bs.ht + k1 * TB + 8 * v);
            qh[v] = vdload(q_lane + 8 * v) * h;
            rsum += vdload(r_lane + 8 * v) * h;
          }
          vdstore(r + 8 * k1, rsum);
          double* qrow = Q + 8 * (k1 * Pa);
          for (int64_t k2 = k1; k2 < Pa; ++k2) {
            vd acc = vdload(qrow + 8 * k2);
#pragma GCC unroll 4
            for (int v = 0; v < TBV; ++v) acc += qh[v] * vdload(bs.ht + k2 * TB + 8 * v);
            vdstore(qrow + 8 * k2, acc);
          }
        }
        block_lnp_backward(in, pp, t0, nb, bs, pw, pb, g.grad_patches);
      }
    }
  });

  // ---- deterministic reductions over segments (in segment order) ----
  std::vector<double> Qs(static_cast<size_t>(Pa * Pa), 0.0), rs(static_cast<size_t>(Pa), 0.0);
  std::vector<double> pw(static_cast<size_t>(P), 0.0), pb(static_cast<size_t>(P), 0.0);
  for (int64_t sg = 0; sg < n_seg; ++sg) {
    const double* Q = dbuf.data() + sg * acc_doubles;
    const double* r = Q + 8 * Pa * Pa;
    const double* lw = r + 8 * Pa;
    const double* lb = lw + P * TB;
    for (int64_t k = 0; k < Pa * Pa; ++k)
      for (int l = 0; l < 8; ++l) Qs[k] += Q[8 * k + l];
    for (int64_t k = 0; k < Pa; ++k)
      for (int l = 0; l < 8; ++l) rs[k] += r[8 * k + l];
    for (int64_t k = 0; k < P; ++k) {
      for (int l = 0; l < TB; ++l) {
        pw[k] += lw[k * TB + l];
        pb[k] += lb[k * TB + l];
      }
    }
  }
  for (int64_t k1 = 0; k1 < Pa; ++k1)  // Q was accumulated in its upper triangle
    for (int64_t k2 = 0; k2 < k1; ++k2) Qs[k1 * Pa + k2] = Qs[k2 * Pa + k1];
  for (int64_t k = 0; k < P; ++k) {
    g.grad_ln_p_w[k] = static_cast<float>(pw[k]);
    g.grad_ln_p_b[k] = static_cast<float>(pb[k]);
  }
  // [grad_weight | grad_bias][j] = ln_d_w[j] M[j] - r - Wc[j] Q;  grad_ln_d_w[j] = Wc[j] . M[j]
  const int nr = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, D / 64)));
  std::vector<double> rowbuf(static_cast<size_t>(Pa * nr));
  const float* wct = pp.wct.get();
  parallel_chunks(D, nr, [&](int64_t jb, int64_t je, int worker) {
    double* out = rowbuf.data() + Pa * worker;
    for (int64_t j = jb; j < je; ++j) {
      double gdw = 0.0;
      for (int64_t k = 0; k < Pa; ++k) {
        float m = 0.0f;
        for (int64_t sg = 0; sg < n_seg; ++sg) m += mbuf.get()[sg * m_stride + k * Dp + j];
        gdw += static_cast<double>(wct[k * Dp + j]) * m;
        out[k] = static_cast<double>(in.ln_d_w[j]) * m - rs[k];
      }
      for (int64_t k2 = 0; k2 < Pa; ++k2) {
        const double wc = wct[k2 * Dp + j];
        const double* qrow = Qs.data() + k2 * Pa;
        for (int64_t k = 0; k < Pa; ++k) out[k] -= wc * qrow[k];
      }
      for (int64_t k = 0; k < P; ++k) g.grad_weight[j * P + k] = static_cast<float>(out[k]);
      g.grad_bias[j] = static_cast<float>(out[P]);
      g.grad_ln_d_w[j] = static_cast<float>(gdw);
    }
  });
  // embedding tables, then grad_ln_d_b = sum over channels of grad_chan_emb (= sum_t g)
  const int ne =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, (NC + NP) / 8)));
  parallel_chunks(NC + NP, ne, [&](int64_t rb, int64_t re, int) {
    for (int64_t row = rb; row < re; ++row) {
      float* dst = row < NC ? g.grad_chan_emb + row * D : g.grad_pos_emb + (row - NC) * D;
      std::memset(dst, 0, static_cast<size_t>(D) * sizeof(float));
      for (int64_t sg = 0; sg < n_seg; ++sg) {
        const float* src = embbuf.get() + sg * emb_stride + row * Dp;
        for (int64_t j = 0; j < D; ++j) dst[j] += src[j];
      }
    }
  });
  std::memset(g.grad_ln_d_b, 0, static_cast<size_t>(D) * sizeof(float));
  for (int64_t c = 0; c < NC; ++c) {
    const float* src = g.grad_chan_emb + c * D;
    for (int64_t j = 0; j < D; ++j) g.grad_ln_d_b[j] += src[j];
  }
}

}  // namespace csfm
