// pybind11 module csfm_kernels._C: argument checks, GIL release, dispatch to csrc kernels.
//
// Every array argument must already be a numpy array (e.g. tensor.numpy()) of the exact dtype,
// C-contiguous, of the expected shape: nothing is converted or copied, and outputs are written
// in place. Violations raise ValueError (std::invalid_argument) naming the argument; index
// values out of range raise IndexError (std::out_of_range).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "kernels.h"

#ifndef CSFM_SOURCE_HASH
#define CSFM_SOURCE_HASH "unknown"
#endif

namespace py = pybind11;

namespace {

constexpr int64_t ANY = -1;  // wildcard dimension in an expected shape

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

std::vector<int64_t> shape_of(const py::array& a) {
  std::vector<int64_t> s(static_cast<size_t>(a.ndim()));
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s[static_cast<size_t>(i)] = a.shape(i);
  return s;
}

template <typename T>
const char* dtype_name();
template <>
const char* dtype_name<float>() { return "float32"; }
template <>
const char* dtype_name<int64_t>() { return "int64"; }

// Checks dtype, shape (ANY matches every size) and C-contiguity; returns the data pointer.
template <typename T>
T* checked(const py::array& a, const char* fn, const char* name,
           const std::vector<int64_t>& expected, bool writable = false) {
  const std::string where = std::string(fn) + ": argument '" + name + "'";
  if (!py::isinstance<py::array_t<T>>(a))
    throw std::invalid_argument(where + " must have dtype " + dtype_name<T>() + ", got " +
                                std::string(py::str(a.dtype())));
  const std::vector<int64_t> shape = shape_of(a);
  bool ok = shape.size() == expected.size();
  for (size_t i = 0; ok && i < shape.size(); ++i)
    ok = expected[i] == ANY || expected[i] == shape[i];
  if (!ok) {
    std::string exp = "[";
    for (size_t i = 0; i < expected.size(); ++i)
      exp += (i ? ", " : "") +
             (expected[i] == ANY ? std::string("*") : std::to_string(expected[i]));
    exp += "]";
    throw std::invalid_argument(where + " must have shape " + exp + ", got " + shape_str(shape));
  }
  if (!(a.flags() & py::array::c_style))
    throw std::invalid_argument(where + " must be C-contiguous (shape " + shape_str(shape) +
                                "); pass tensor.contiguous().numpy()");
  if (writable && !a.writeable()) throw std::invalid_argument(where + " must be writeable");
  return static_cast<T*>(const_cast<void*>(a.data()));
}

void check_threads(const char* fn, int n_threads) {
  if (n_threads < 1)
    throw std::invalid_argument(std::string(fn) + ": n_threads must be >= 1, got " +
                                std::to_string(n_threads));
}

void check_index_range(const char* fn, const char* name, const int64_t* idx, int64_t n,
                       int64_t lo, int64_t hi) {
  for (int64_t i = 0; i < n; ++i) {
    if (idx[i] < lo || idx[i] >= hi) {
      throw std::out_of_range(std::string(fn) + ": " + name + "[" + std::to_string(i) +
                              "] = " + std::to_string(idx[i]) + " is out of range [" +
                              std::to_string(lo) + ", " + std::to_string(hi) + ")");
    }
  }
}

// Validates the forward inputs shared by patch_embed_forward / _backward.
csfm::PatchEmbedInputs patch_embed_inputs(const char* fn, const py::array& patches,
                                          const py::array& token_chan,
                                          const py::array& token_pos, const py::array& ln_p_w,
                                          const py::array& ln_p_b, const py::array& weight,
                                          const py::array& bias, const py::array& ln_d_w,
                                          const py::array& ln_d_b, const py::array& chan_emb,
                                          const py::array& pos_emb, double eps) {
  csfm::PatchEmbedInputs in;
  in.patches = checked<float>(patches, fn, "patches", {ANY, ANY});
  in.T = patches.shape(0);
  in.P = patches.shape(1);
  in.weight = checked<float>(weight, fn, "weight", {ANY, in.P});
  in.D = weight.shape(0);
  if (in.P < 1) throw std::invalid_argument(std::string(fn) + ": patch length P must be >= 1");
  if (in.D < 1) throw std::invalid_argument(std::string(fn) + ": width D must be >= 1");
  in.chan_emb = checked<float>(chan_emb, fn, "chan_emb", {ANY, in.D});
  in.pos_emb = checked<float>(pos_emb, fn, "pos_emb", {ANY, in.D});
  in.NC = chan_emb.shape(0);
  in.NP = pos_emb.shape(0);
  in.token_chan = checked<int64_t>(token_chan, fn, "token_chan", {in.T});
  in.token_pos = checked<int64_t>(token_pos, fn, "token_pos", {in.T});
  in.ln_p_w = checked<float>(ln_p_w, fn, "ln_p_w", {in.P});
  in.ln_p_b = checked<float>(ln_p_b, fn, "ln_p_b", {in.P});
  in.bias = checked<float>(bias, fn, "bias", {in.D});
  in.ln_d_w = checked<float>(ln_d_w, fn, "ln_d_w", {in.D});
  in.ln_d_b = checked<float>(ln_d_b, fn, "ln_d_b", {in.D});
  in.eps = eps;
  check_index_range(fn, "token_chan", in.token_chan, in.T, 0, in.NC);
  check_index_range(fn, "token_pos", in.token_pos, in.T, 0, in.NP);
  return in;
}

void patch_embed_forward_py(const py::array& patches, const py::array& token_chan,
                            const py::array& token_pos, const py::array& ln_p_w,
                            const py::array& ln_p_b, const py::array& weight,
                            const py::array& bias, const py::array& ln_d_w,
                            const py::array& ln_d_b, const py::array& chan_emb,
                            const py::array& pos_emb, double eps, const py::array& out,
                            int n_threads) {
  const char* fn = "patch_embed_forward";
  check_threads(fn, n_threads);
  const csfm::PatchEmbedInputs in =
      patch_embed_inputs(fn, patches, token_chan, token_pos, ln_p_w, ln_p_b, weight, bias,
                         ln_d_w, ln_d_b, chan_emb, pos_emb, eps);
  float* o = checked<float>(out, fn, "out", {in.T, in.D}, true);
  py::gil_scoped_release release;
  csfm::patch_embed_forward(in, o, n_threads);
}

void patch_embed_backward_py(
    const py::array& grad_out, const py::array& patches, const py::array& token_chan,
    const py::array& token_pos, const py::array& ln_p_w, const py::array& ln_p_b,
    const py::array& weight, const py::array& bias, const py::array& ln_d_w,
    const py::array& ln_d_b, const py::array& chan_emb, const py::array& pos_emb, double eps,
    const py::array& grad_patches, const py::array& grad_ln_p_w, const py::array& grad_ln_p_b,
    const py::array& grad_weight, const py::array& grad_bias, const py::array& grad_ln_d_w,
    const py::array& grad_ln_d_b, const py::array& grad_chan_emb,
    const py::array& grad_pos_emb, int n_threads) {
  const char* fn = "patch_embed_backward";
  check_threads(fn, n_threads);
  const csfm::PatchEmbedInputs in =
      patch_embed_inputs(fn, patches, token_chan, token_pos, ln_p_w, ln_p_b, weight, bias,
                         ln_d_w, ln_d_b, chan_emb, pos_emb, eps);
  const float* go = checked<float>(grad_out, fn, "grad_out", {in.T, in.D});
  csfm::PatchEmbedGrads g;
  g.grad_patches = checked<float>(grad_patches, fn, "grad_patches", {in.T, in.P}, true);
  g.grad_ln_p_w = checked<float>(grad_ln_p_w, fn, "grad_ln_p_w", {in.P}, true);
  g.grad_ln_p_b = checked<float>(grad_ln_p_b, fn, "grad_ln_p_b", {in.P}, true);
  g.grad_weight = checked<float>(grad_weight, fn, "grad_weight", {in.D, in.P}, true);
  g.grad_bias = checked<float>(grad_bias, fn, "grad_bias", {in.D}, true);
  g.grad_ln_d_w = checked<float>(grad_ln_d_w, fn, "grad_ln_d_w", {in.D}, true);
  g.grad_ln_d_b = checked<float>(grad_ln_d_b, fn, "grad_ln_d_b", {in.D}, true);
  g.grad_chan_emb = checked<float>(grad_chan_emb, fn, "grad_chan_emb", {in.NC, in.D}, true);
  g.grad_pos_emb = checked<float>(grad_pos_emb, fn, "grad_pos_emb", {in.NP, in.D}, true);
  py::gil_scoped_release release;
  csfm::patch_embed_backward(in, go, g, n_threads);
}

void gather_rows_py(const py::array& src, const py::array& rows, const py::array& out,
                    int n_threads) {
  const char* fn = "gather_rows";
  check_threads(fn, n_threads);
  const float* s = checked<float>(src, fn, "src", {ANY, ANY});
  const int64_t M = src.shape(0), D = src.shape(1);
  const int64_t* r = checked<int64_t>(rows, fn, "rows", {ANY});
  const int64_t K = rows.shape(0);
  float* o = checked<float>(out, fn, "out", {K, D}, true);
  check_index_range(fn, "rows", r, K, 0, M);
  py::gil_scoped_release release;
  csfm::gather_rows(s, r, K, D, o, n_threads);
}

void scatter_rows_fill_py(const py::array& src, const py::array& source_rows,
                          const py::array& fill, const py::array& out, int n_threads) {
  const char* fn = "scatter_rows_fill";
  check_threads(fn, n_threads);
  const float* s = checked<float>(src, fn, "src", {ANY, ANY});
  const int64_t K = src.shape(0), D = src.shape(1);
  const int64_t* r = checked<int64_t>(source_rows, fn, "source_rows", {ANY});
  const int64_t M = source_rows.shape(0);
  const float* f = checked<float>(fill, fn, "fill", {D});
  float* o = checked<float>(out, fn, "out", {M, D}, true);
  check_index_range(fn, "source_rows", r, M, -1, K);
  py::gil_scoped_release release;
  csfm::scatter_rows_fill(s, r, f, M, D, o, n_threads);
}

void scatter_rows_fill_backward_py(const py::array& grad_out, const py::array& source_rows,
                                   const py::array& grad_src, const py::array& grad_fill,
                                   int n_threads) {
  const char* fn = "scatter_rows_fill_backward";
  check_threads(fn, n_threads);
  const float* go = checked<float>(grad_out, fn, "grad_out", {ANY, ANY});
  const int64_t M = grad_out.shape(0), D = grad_out.shape(1);
  const int64_t* r = checked<int64_t>(source_rows, fn, "source_rows", {M});
  float* gs = checked<float>(grad_src, fn, "grad_src", {ANY, D}, true);
  const int64_t K = grad_src.shape(0);
  float* gf = checked<float>(grad_fill, fn, "grad_fill", {D}, true);
  check_index_range(fn, "source_rows", r, M, -1, K);
  // each source row may be referenced at most once (else the copies would race)
  std::vector<unsigned char> seen(static_cast<size_t>(K), 0);
  for (int64_t i = 0; i < M; ++i) {
    if (r[i] < 0) continue;
    if (seen[static_cast<size_t>(r[i])])
      throw std::invalid_argument(std::string(fn) + ": source_rows[" + std::to_string(i) +
                                  "] = " + std::to_string(r[i]) +
                                  " repeats an earlier row; each kept row must appear once");
    seen[static_cast<size_t>(r[i])] = 1;
  }
  py::gil_scoped_release release;
  csfm::scatter_rows_fill_backward(go, r, M, K, D, gs, gf, n_threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "csfm C++ CPU kernels (numpy arrays in, outputs written in place, no copies)";

  m.def("patch_embed_forward", &patch_embed_forward_py, py::arg("patches"),
        py::arg("token_chan"), py::arg("token_pos"), py::arg("ln_p_w"), py::arg("ln_p_b"),
        py::arg("weight"), py::arg("bias"), py::arg("ln_d_w"), py::arg("ln_d_b"),
        py::arg("chan_emb"), py::arg("pos_emb"), py::arg("eps"), py::arg("out"),
        py::arg("n_threads"),
        "out[t] = LN_D(weight @ LN_P(patches[t]) + bias) + chan_emb[token_chan[t]] + "
        "pos_emb[token_pos[t]], written into out [T, D].");
  m.def("patch_embed_backward", &patch_embed_backward_py, py::arg("grad_out"),
        py::arg("patches"), py::arg("token_chan"), py::arg("token_pos"), py::arg("ln_p_w"),
        py::arg("ln_p_b"), py::arg("weight"), py::arg("bias"), py::arg("ln_d_w"),
        py::arg("ln_d_b"), py::arg("chan_emb"), py::arg("pos_emb"), py::arg("eps"),
        py::arg("grad_patches"), py::arg("grad_ln_p_w"), py::arg("grad_ln_p_b"),
        py::arg("grad_weight"), py::arg("grad_bias"), py::arg("grad_ln_d_w"),
        py::arg("grad_ln_d_b"), py::arg("grad_chan_emb"), py::arg("grad_pos_emb"),
        py::arg("n_threads"),
        "Gradients of patch_embed_forward; every grad_* array is overwritten.");
  m.def("gather_rows", &gather_rows_py, py::arg("src"), py::arg("rows"), py::arg("out"),
        py::arg("n_threads"), "out[i] = src[rows[i]]");
  m.def("scatter_rows_fill", &scatter_rows_fill_py, py::arg("src"), py::arg("source_rows"),
        py::arg("fill"), py::arg("out"), py::arg("n_threads"),
        "out[i] = src[source_rows[i]] if source_rows[i] >= 0 else fill");
  m.def("scatter_rows_fill_backward", &scatter_rows_fill_backward_py, py::arg("grad_out"),
        py::arg("source_rows"), py::arg("grad_src"), py::arg("grad_fill"),
        py::arg("n_threads"),
        "grad_src[source_rows[i]] = grad_out[i] for kept rows (unreferenced rows zeroed); "
        "grad_fill = sum of grad_out rows with source_rows == -1.");
  m.def("source_hash", [] { return std::string(CSFM_SOURCE_HASH); },
        "Hash of csrc/ this module was built from.");
  m.def(
      "n_threads_default",
      [] { return static_cast<int>(std::max(1u, std::thread::hardware_concurrency())); },
      "std::thread::hardware_concurrency() (1 where it reports 0)");
}
