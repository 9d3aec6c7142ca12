// Declarations shared by the C++ CPU kernels (csrc/*.cpp) and their pybind11 bindings.
//
// The compute entry points take raw pointers and sizes only: shape/dtype/contiguity checks,
// index-range checks and the GIL live in bindings.cpp. Every array is dense row-major
// (C-contiguous) float32 unless noted; index arrays are int64. Callers must have validated
// every index before calling (the kernels do not re-check).
#pragma once
#include <cstdint>

namespace csfm {

// ---------------------------------------------------------------------------------------
// Patch embedding: per token t
//   h = LayerNorm_P(patches[t]; ln_p_w, ln_p_b)          (biased variance, eps inside sqrt)
//   y = weight @ h + bias                                 (weight [D, P], torch Linear layout)
//   out[t] = LayerNorm_D(y; ln_d_w, ln_d_b) + chan_emb[token_chan[t]] + pos_emb[token_pos[t]]
// ---------------------------------------------------------------------------------------
struct PatchEmbedInputs {
  int64_t T = 0;   // tokens
  int64_t P = 0;   // patch length
  int64_t D = 0;   // model width
  int64_t NC = 0;  // rows of chan_emb
  int64_t NP = 0;  // rows of pos_emb
  const float* patches = nullptr;     // [T, P]
  const int64_t* token_chan = nullptr;  // [T], values in [0, NC)
  const int64_t* token_pos = nullptr;   // [T], values in [0, NP)
  const float* ln_p_w = nullptr;      // [P]
  const float* ln_p_b = nullptr;      // [P]
  const float* weight = nullptr;      // [D, P]
  const float* bias = nullptr;        // [D]
  const float* ln_d_w = nullptr;      // [D]
  const float* ln_d_b = nullptr;      // [D]
  const float* chan_emb = nullptr;    // [NC, D]
  const float* pos_emb = nullptr;     // [NP, D]
  double eps = 1e-5;
};

// Gradients of patch_embed_forward. Every buffer is overwritten (no need to zero it first).
struct PatchEmbedGrads {
  float* grad_patches = nullptr;   // [T, P]
  float* grad_ln_p_w = nullptr;    // [P]
  float* grad_ln_p_b = nullptr;    // [P]
  float* grad_weight = nullptr;    // [D, P]
  float* grad_bias = nullptr;      // [D]
  float* grad_ln_d_w = nullptr;    // [D]
  float* grad_ln_d_b = nullptr;    // [D]
  float* grad_chan_emb = nullptr;  // [NC, D]
  float* grad_pos_emb = nullptr;   // [NP, D]
};

// out: [T, D], written once per element (outputs of 8 MiB or more with non-temporal stores
// when their rows are vector aligned). The result does not depend on n_threads.
void patch_embed_forward(const PatchEmbedInputs& in, float* out, int n_threads);

// grad_out: [T, D]. Works from the inputs alone (no saved activations): the LayerNorm_D
// statistics and dy are expressed through the column-centred weight (see patch_embed.cpp),
// so a token costs two D x (P + 1) matmuls. Reductions use fixed token segments summed in
// segment order: bitwise reproducible for a fixed n_threads.
void patch_embed_backward(const PatchEmbedInputs& in, const float* grad_out,
                          const PatchEmbedGrads& grads, int n_threads);

// ---------------------------------------------------------------------------------------
// Masked-row gather / scatter (token dropping for masked pretraining)
// ---------------------------------------------------------------------------------------

// out[i, :] = src[rows[i], :] for i < K. src [M, D], rows [K] in [0, M), out [K, D].
void gather_rows(const float* src, const int64_t* rows, int64_t K, int64_t D, float* out,
                 int n_threads);

// out[i, :] = source_rows[i] >= 0 ? src[source_rows[i], :] : fill for i < M.
// src [K, D], source_rows [M] in [-1, K), fill [D], out [M, D].
void scatter_rows_fill(const float* src, const int64_t* source_rows, const float* fill,
                       int64_t M, int64_t D, float* out, int n_threads);

// Backward of scatter_rows_fill. grad_src [K, D] and grad_fill [D] are overwritten: each
// kept row i (source_rows[i] >= 0) is copied to grad_src[source_rows[i]] (each source row
// must appear at most once; rows of grad_src that no i refers to are zeroed), the rows with
// source_rows[i] == -1 are summed into grad_fill (per-thread partials, deterministic).
void scatter_rows_fill_backward(const float* grad_out, const int64_t* source_rows, int64_t M,
                                int64_t K, int64_t D, float* grad_src, float* grad_fill,
                                int n_threads);

}  // namespace csfm
