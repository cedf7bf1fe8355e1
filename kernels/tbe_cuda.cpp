// Host bindings of the CUDA table-batched embedding kernels (kernels/tbe.cu): input
// checks, the grouping of indices by row for the fused update (a stable sort, so each
// row's gradients are summed in index order, as on the CPU), and error reporting.
// Built only when torch has CUDA; same contract as kernels/tbe_cpu.cpp (MPC, PAPERS.md
// §1, §5; semantics in mpc/embedding/ops.py).
//
// export: tbe_pool_cuda tbe_sgd_update_cuda tbe_quantize_rows_cuda tbe_dequantize_rows_cuda
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>

extern "C" {
int mpc_tbe_pool_cuda(int precision, const void* weights, int64_t dim, const int64_t* table_offsets,
                      int64_t T, int64_t B, int64_t N, int64_t rows, const int64_t* indices,
                      const int64_t* offsets, const float* cache, const int64_t* slots64,
                      const int32_t* slots32, float* out, unsigned long long* errors, void* stream);
int mpc_tbe_rows_cuda(const int64_t* table_offsets, int64_t T, int64_t B, int64_t N, int64_t rows,
                      const int64_t* indices, const int64_t* offsets, int64_t* global_rows,
                      int64_t* bag_of, unsigned long long* errors, void* stream);
int mpc_tbe_sgd_cuda(int precision, void* weights, int64_t dim, int64_t T, int64_t B, int64_t rows,
                     const float* grad_out, const int64_t* global_rows, const int64_t* order,
                     const int64_t* bag_of, const int64_t* seg_starts, int64_t segments, float lr,
                     int stochastic, uint32_t step_key, float* cache, const int64_t* slots64,
                     const int32_t* slots32, void* stream);
int mpc_tbe_quantize_rows_cuda(int precision, const float* x, int64_t n, int64_t dim, void* out,
                               int stochastic, uint32_t step_key, const int64_t* ids, int purpose,
                               void* stream);
int mpc_tbe_dequantize_rows_cuda(int precision, const void* storage, int64_t n, int64_t dim, float* out,
                                 void* stream);
}

namespace mpc_tbe_cuda_host {
using torch::Tensor;

torch::ScalarType storage_dtype(int64_t p) {
  return p == 0 ? torch::kFloat32 : p == 1 ? torch::kFloat16 : torch::kUInt8;
}

int64_t row_width(int64_t p, int64_t dim) {  // elements of storage_dtype per row
  if (p <= 1) return dim;
  const int64_t bits = p == 2 ? 8 : p == 3 ? 4 : 2;
  return (dim * bits + 7) / 8 + (p == 2 ? 8 : 4);
}

void check_cuda(const Tensor& t, const char* what, const Tensor& like) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device() && t.is_contiguous(), what,
              " must be a contiguous tensor on ", like.device());
}

void check_storage(int64_t p, const Tensor& w, int64_t dim) {
  TORCH_CHECK(p >= 0 && p <= 4, "unknown precision code ", p);
  TORCH_CHECK(dim >= 1, "dim must be >= 1, got ", dim);
  TORCH_CHECK(w.is_cuda() && w.is_contiguous() && w.dim() == 2 && w.size(1) == row_width(p, dim) &&
                  w.scalar_type() == storage_dtype(p),
              "weights: expected contiguous CUDA ", c10::toString(storage_dtype(p)), " (rows, ",
              row_width(p, dim), "), got ", w.scalar_type(), " ", w.sizes());
}

struct Batch {
  int64_t T, B, N, rows;
};

Batch check_batch(const Tensor& weights, const Tensor& table_offsets, const Tensor& indices,
                  const Tensor& offsets) {
  for (const Tensor* t : {&table_offsets, &indices, &offsets}) {
    check_cuda(*t, "table_offsets/indices/offsets", weights);
    TORCH_CHECK(t->dim() == 1 && t->scalar_type() == torch::kInt64, "ids must be 1-D int64");
  }
  Batch b;
  b.T = table_offsets.numel() - 1;
  b.N = indices.numel();
  b.rows = weights.size(0);
  TORCH_CHECK(b.T >= 1, "table_offsets needs T+1 >= 2 entries");
  const int64_t bags = offsets.numel() - 1;
  TORCH_CHECK(bags >= 0 && bags % b.T == 0, "offsets has ", offsets.numel(),
              " entries; expected T*B+1 with T=", b.T);
  b.B = bags / b.T;
  // One small device-to-host copy for the scalar checks.
  Tensor ends = torch::stack({table_offsets[0], table_offsets[b.T], offsets[0], offsets[bags]}).cpu();
  const int64_t* e = ends.data_ptr<int64_t>();
  TORCH_CHECK(e[0] == 0 && e[1] == b.rows, "table_offsets must run from 0 to the storage's ", b.rows,
              " rows");
  TORCH_CHECK(e[2] == 0 && e[3] == b.N, "offsets must start at 0 and end at len(indices)=", b.N);
  TORCH_CHECK((table_offsets.slice(0, 1) > table_offsets.slice(0, 0, b.T)).all().item<bool>(),
              "every table needs at least one row");
  return b;
}

struct Slots {
  const float* cache = nullptr;
  float* cache_mut = nullptr;
  const int64_t* s64 = nullptr;
  const int32_t* s32 = nullptr;
};

Slots check_slots(const std::optional<Tensor>& cache_weights, const std::optional<Tensor>& slots,
                  const Tensor& weights, int64_t dim, int64_t n) {
  Slots s;
  TORCH_CHECK(cache_weights.has_value() == slots.has_value(),
              "cache_weights and slots go together (both or neither)");
  if (!slots.has_value()) return s;
  const Tensor& w = *cache_weights;
  const Tensor& sl = *slots;
  check_cuda(w, "cache_weights", weights);
  check_cuda(sl, "slots", weights);
  TORCH_CHECK(w.dim() == 2 && w.size(1) == dim && w.scalar_type() == torch::kFloat32,
              "cache_weights must be float32 (slots, ", dim, ")");
  TORCH_CHECK(sl.dim() == 1 && sl.numel() == n &&
                  (sl.scalar_type() == torch::kInt64 || sl.scalar_type() == torch::kInt32),
              "slots must be int32/int64 with one entry per index");
  if (n > 0) {
    TORCH_CHECK(((sl >= -1) & (sl < w.size(0))).all().item<bool>(), "slots out of range [-1, ",
                w.size(0), ")");
  }
  s.cache = w.data_ptr<float>();
  s.cache_mut = w.data_ptr<float>();
  if (sl.scalar_type() == torch::kInt64) s.s64 = sl.data_ptr<int64_t>();
  else s.s32 = sl.data_ptr<int32_t>();
  return s;
}

void check_launch(int err) {
  TORCH_CHECK(err == 0, "CUDA kernel launch failed: ", cudaGetErrorString((cudaError_t)err));
}

// Raise for the first bad bag / id recorded by a kernel (errors = [bad id, bad bag]).
void raise_errors(const Tensor& errors, const Batch& b, const Tensor& table_offsets, const Tensor& indices,
                  const Tensor& offsets) {
  Tensor host = errors.cpu();
  const uint64_t* e = reinterpret_cast<const uint64_t*>(host.data_ptr<int64_t>());
  const uint64_t none = ~0ull;
  if (e[1] != none) {
    const int64_t k = (int64_t)e[1];
    TORCH_CHECK_VALUE(false, "offsets must be non-decreasing within [0, len(indices)]: bag ", k,
                      " spans [", offsets[k].item<int64_t>(), ", ", offsets[k + 1].item<int64_t>(), ")");
  }
  if (e[0] != none) {
    const int64_t p = (int64_t)e[0];
    Tensor pos = torch::full({1}, p, offsets.options());
    const int64_t k = torch::searchsorted(offsets, pos, false, true).item<int64_t>() - 1;
    const int64_t t = k / b.B;
    const int64_t card = (table_offsets[t + 1] - table_offsets[t]).item<int64_t>();
    TORCH_CHECK_VALUE(false, "id ", indices[p].item<int64_t>(), " out of range for table ", t, " (C", t + 1,
                      ", ", card, " rows)");
  }
}

Tensor error_slots(const Tensor& like) {
  return torch::full({2}, -1, like.options().dtype(torch::kInt64));  // all bits set = none
}

}  // namespace mpc_tbe_cuda_host

torch::Tensor tbe_pool_cuda(int64_t precision, torch::Tensor weights, torch::Tensor table_offsets,
                            torch::Tensor indices, torch::Tensor offsets, int64_t dim,
                            std::optional<torch::Tensor> cache_weights, std::optional<torch::Tensor> slots) {
  using namespace mpc_tbe_cuda_host;
  check_storage(precision, weights, dim);
  const c10::cuda::CUDAGuard guard(weights.device());
  Batch b = check_batch(weights, table_offsets, indices, offsets);
  Slots s = check_slots(cache_weights, slots, weights, dim, b.N);
  Tensor out = torch::empty({b.B, b.T, dim}, weights.options().dtype(torch::kFloat32));
  Tensor errors = error_slots(weights);
  check_launch(mpc_tbe_pool_cuda((int)precision, weights.data_ptr(), dim, table_offsets.data_ptr<int64_t>(),
                                 b.T, b.B, b.N, b.rows, indices.data_ptr<int64_t>(),
                                 offsets.data_ptr<int64_t>(), s.cache, s.s64, s.s32, out.data_ptr<float>(),
                                 reinterpret_cast<unsigned long long*>(errors.data_ptr<int64_t>()),
                                 c10::cuda::getCurrentCUDAStream().stream()));
  raise_errors(errors, b, table_offsets, indices, offsets);
  return out;
}

void tbe_sgd_update_cuda(int64_t precision, torch::Tensor weights, torch::Tensor table_offsets,
                         torch::Tensor indices, torch::Tensor offsets, torch::Tensor grad_out, double lr,
                         int64_t dim, bool stochastic, int64_t step_key,
                         std::optional<torch::Tensor> cache_weights, std::optional<torch::Tensor> slots) {
  using namespace mpc_tbe_cuda_host;
  check_storage(precision, weights, dim);
  const c10::cuda::CUDAGuard guard(weights.device());
  Batch b = check_batch(weights, table_offsets, indices, offsets);
  Slots s = check_slots(cache_weights, slots, weights, dim, b.N);
  check_cuda(grad_out, "grad_out", weights);
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == b.B && grad_out.size(1) == b.T &&
                  grad_out.size(2) == dim && grad_out.scalar_type() == torch::kFloat32,
              "grad_out must be float32 (", b.B, ", ", b.T, ", ", dim, "), got ", grad_out.sizes());
  if (b.N == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  Tensor rows = torch::empty({b.N}, indices.options());
  Tensor bag_of = torch::empty({b.N}, indices.options());
  Tensor errors = error_slots(weights);
  check_launch(mpc_tbe_rows_cuda(table_offsets.data_ptr<int64_t>(), b.T, b.B, b.N, b.rows,
                                 indices.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
                                 rows.data_ptr<int64_t>(), bag_of.data_ptr<int64_t>(),
                                 reinterpret_cast<unsigned long long*>(errors.data_ptr<int64_t>()), stream));
  raise_errors(errors, b, table_offsets, indices, offsets);  // before anything is written
  // Stable sort: positions of one row stay in index order (the summation order).
  auto sorted = torch::sort(rows, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  Tensor sorted_rows = std::get<0>(sorted), order = std::get<1>(sorted);
  auto uniq = torch::unique_consecutive(sorted_rows, /*return_inverse=*/false, /*return_counts=*/true);
  Tensor counts = std::get<2>(uniq);
  Tensor seg_starts = torch::zeros({counts.numel() + 1}, counts.options());
  seg_starts.slice(0, 1).copy_(torch::cumsum(counts, 0));
  if (s.s64 || s.s32) {
    Tensor sl = slots->to(torch::kInt64).index_select(0, order);
    Tensor first = sl.index_select(0, seg_starts.slice(0, 0, counts.numel())).repeat_interleave(counts);
    TORCH_CHECK_VALUE(sl.eq(first).all().item<bool>(),
                      "slots: all occurrences of a row must have the same slot");
  }
  check_launch(mpc_tbe_sgd_cuda((int)precision, weights.data_ptr(), dim, b.T, b.B, b.rows,
                                grad_out.data_ptr<float>(), rows.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
                                bag_of.data_ptr<int64_t>(), seg_starts.data_ptr<int64_t>(), counts.numel(),
                                (float)lr, stochastic ? 1 : 0, (uint32_t)step_key, s.cache_mut, s.s64, s.s32,
                                stream));
}

torch::Tensor tbe_quantize_rows_cuda(int64_t precision, torch::Tensor x, bool stochastic, int64_t step_key,
                                     torch::Tensor rows, int64_t purpose) {
  using namespace mpc_tbe_cuda_host;
  TORCH_CHECK(precision >= 0 && precision <= 4, "unknown precision code ", precision);
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.dim() == 2 && x.size(1) >= 1 &&
                  x.scalar_type() == torch::kFloat32,
              "x must be contiguous float32 CUDA (n, dim)");
  check_cuda(rows, "rows", x);
  TORCH_CHECK(rows.dim() == 1 && rows.numel() == x.size(0) && rows.scalar_type() == torch::kInt64,
              "rows must be int64 with one id per row of x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), dim = x.size(1);
  Tensor out = torch::empty({n, row_width(precision, dim)}, x.options().dtype(storage_dtype(precision)));
  check_launch(mpc_tbe_quantize_rows_cuda((int)precision, x.data_ptr<float>(), n, dim, out.data_ptr(),
                                          stochastic ? 1 : 0, (uint32_t)step_key, rows.data_ptr<int64_t>(),
                                          (int)purpose, c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

torch::Tensor tbe_dequantize_rows_cuda(int64_t precision, torch::Tensor storage, int64_t dim) {
  using namespace mpc_tbe_cuda_host;
  check_storage(precision, storage, dim);
  const c10::cuda::CUDAGuard guard(storage.device());
  const int64_t n = storage.size(0);
  Tensor out = torch::empty({n, dim}, storage.options().dtype(torch::kFloat32));
  check_launch(mpc_tbe_dequantize_rows_cuda((int)precision, storage.data_ptr(), n, dim, out.data_ptr<float>(),
                                            c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}
