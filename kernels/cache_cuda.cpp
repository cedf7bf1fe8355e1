// Host bindings of the CUDA cache kernels (kernels/cache.cu): same contract as
// cache_prepare / cache_probe / cache_rebuild in kernels/cache_cpu.cpp, for CUDA
// tensors. Built only when torch has CUDA and a GPU is present (mpc/kernels.py).
//
// export: cache_prepare_cuda cache_probe_cuda cache_rebuild_cuda

#include <vector>

#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

extern "C" cudaError_t mpc_cache_locate_cuda(const int64_t* indices, const int64_t* table_bounds,
                                             const int64_t* table_offsets, const int64_t* bounds,
                                             const int64_t* geometry, int64_t n, int64_t T, int64_t G, int64_t* row,
                                             int64_t* set_key, int32_t* group, unsigned long long* first_bad,
                                             unsigned long long* first_stray, cudaStream_t stream);
extern "C" cudaError_t mpc_cache_process_cuda(
    int64_t* tags, int64_t* times, int32_t* row_counts, int32_t* slot_counts, int32_t* order_state,
    int32_t* set_state, int32_t* index, int64_t state_stride, const int64_t* rows, const int64_t* order,
    const int64_t* seg_start,
    const int64_t* seg_len, int64_t nseg, const int32_t* group, const int64_t* set_key, const int64_t* bounds,
    const int64_t* geometry, const int64_t* table_offsets, int64_t T, int32_t policy, const int64_t* clocks,
    int64_t* slot_out, int64_t* evicted, uint8_t* filled, unsigned long long* counters,
    unsigned long long* touched, uint8_t* storage, float* cache, int32_t p, int32_t dim, int64_t rb,
    bool stochastic, uint32_t step_key, int32_t purpose, cudaStream_t stream);
extern "C" cudaError_t mpc_cache_probe_cuda(int64_t* tags, int64_t* times, int32_t* order_state,
                                            int32_t* set_state, int32_t* index, int64_t state_stride,
                                            const int64_t* rows, const int64_t* set_key, const int32_t* group,
                                            const int64_t* geometry, int64_t n, int64_t* slot_out,
                                            cudaStream_t stream);
void cache_rebuild(torch::Tensor geometry, int64_t policy, std::vector<torch::Tensor> state,
                   std::vector<torch::Tensor> derived);

namespace mpc_cache_cuda {

void check_cuda(const torch::Tensor& t, torch::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == dtype && t.is_contiguous(), name,
              " must be a contiguous CUDA tensor of ", c10::toString(dtype));
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "mpc cache: ", what, " failed: ", cudaGetErrorString(err));
}

struct Located {
  torch::Tensor row, set_key, group, geometry, bounds, table_offsets;
};

torch::Tensor on(const torch::Tensor& t, const torch::Device& dev) { return t.to(dev, torch::kInt64).contiguous(); }

// Row, group and set of every id on the device; raises on an id outside its table.
Located locate(const torch::Tensor& indices, const torch::Tensor& table_bounds, const torch::Tensor& bounds,
               const torch::Tensor& geometry, const torch::Tensor& table_offsets) {
  check_cuda(indices, torch::kInt64, "indices");
  const int64_t n = indices.numel(), G = geometry.size(0), T = table_offsets.numel() - 1;
  auto dev = indices.device();
  Located out;
  out.geometry = on(geometry, dev);
  out.bounds = on(bounds, dev);
  out.table_offsets = on(table_offsets, dev);
  auto tb = on(table_bounds, dev);
  TORCH_CHECK(out.bounds.numel() == G + 1 && tb.numel() == T + 1, "bounds must have G+1, table_bounds T+1 entries");
  out.row = torch::empty({n}, indices.options());
  out.set_key = torch::empty({n}, indices.options());
  out.group = torch::empty({n}, indices.options().dtype(torch::kInt32));
  auto flags = torch::full({2}, n, indices.options());  // first bad id, first stray row
  auto* f = reinterpret_cast<unsigned long long*>(flags.data_ptr<int64_t>());
  check_launch(mpc_cache_locate_cuda(indices.data_ptr<int64_t>(), tb.data_ptr<int64_t>(),
                                     out.table_offsets.data_ptr<int64_t>(), out.bounds.data_ptr<int64_t>(),
                                     out.geometry.data_ptr<int64_t>(), n, T, G, out.row.data_ptr<int64_t>(),
                                     out.set_key.data_ptr<int64_t>(), out.group.data_ptr<int32_t>(), f, f + 1,
                                     c10::cuda::getCurrentCUDAStream()),
               "locate");
  auto host = flags.cpu();
  const int64_t bad = host[0].item<int64_t>(), stray = host[1].item<int64_t>();
  TORCH_CHECK(bad == n, "id ", bad < n ? indices[bad].item<int64_t>() : 0, " at position ", bad,
              " out of range for its table");
  TORCH_CHECK(stray == n, "cache: id at position ", stray, " is outside the rows of its cache group");
  return out;
}

}  // namespace mpc_cache_cuda

// Same contract as cache_prepare (kernels/cache_cpu.cpp), for CUDA tensors.
std::vector<torch::Tensor> cache_prepare_cuda(torch::Tensor indices, torch::Tensor table_bounds,
                                              torch::Tensor bounds, torch::Tensor geometry,
                                              torch::Tensor table_offsets, int64_t policy,
                                              std::vector<torch::Tensor> state, std::vector<torch::Tensor> derived,
                                              std::vector<torch::Tensor> rowdata, int64_t precision,
                                              bool stochastic, int64_t step_key, int64_t purpose) {
  using namespace mpc_cache_cuda;
  TORCH_CHECK(state.size() == 5 && derived.size() == 5, "cache_prepare_cuda: state/derived have the wrong length");
  check_cuda(state[0], torch::kInt64, "tags");
  check_cuda(state[1], torch::kInt64, "times");
  check_cuda(state[2], torch::kInt32, "lfu_counts");
  check_cuda(state[3], torch::kInt64, "clocks");
  check_cuda(state[4], torch::kInt64, "counters");
  // derived[4] (the CPU kernel's set headers) is not used on the GPU; after a move back
  // to the CPU the module rebuilds it.
  for (int k = 0; k < 4; ++k) check_cuda(derived[k], torch::kInt32, "order/set_state/index/slot_counts");
  uint8_t* storage = nullptr;
  float* cache = nullptr;
  int64_t dim = 0, rb = 0;
  if (!rowdata.empty()) {
    TORCH_CHECK(rowdata.size() == 2, "rowdata is [] or [storage, cache_weights]");
    check_cuda(rowdata[1], torch::kFloat32, "cache_weights");
    TORCH_CHECK(rowdata[0].is_cuda() && rowdata[0].is_contiguous(), "storage must be contiguous CUDA");
    dim = rowdata[1].size(1);
    rb = (int64_t)(rowdata[0].nbytes() / rowdata[0].size(0));
    storage = reinterpret_cast<uint8_t*>(rowdata[0].data_ptr());
    cache = rowdata[1].data_ptr<float>();
  }
  const int64_t n = indices.numel();
  Located loc = locate(indices, table_bounds, bounds, geometry, table_offsets);
  // One segment per non-empty set, its accesses in batch order (stable sort).
  auto sorted = torch::sort(loc.set_key, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  torch::Tensor keys = std::get<0>(sorted), order = std::get<1>(sorted);
  torch::Tensor seg_len = std::get<2>(torch::unique_consecutive(keys, false, true));
  torch::Tensor seg_start = seg_len.cumsum(0) - seg_len;
  auto slots = torch::empty({n}, indices.options());
  auto evicted = torch::empty({n}, indices.options());
  auto filled = torch::zeros({n}, indices.options().dtype(torch::kUInt8));
  auto touched = torch::zeros({1}, indices.options());
  check_launch(mpc_cache_process_cuda(
      state[0].data_ptr<int64_t>(), state[1].data_ptr<int64_t>(), state[2].data_ptr<int32_t>(),
      policy == 0 ? nullptr : derived[3].data_ptr<int32_t>(), derived[0].data_ptr<int32_t>(),
      derived[1].data_ptr<int32_t>(), derived[2].data_ptr<int32_t>(), policy == 0 ? 3 : 1,
      loc.row.data_ptr<int64_t>(), order.data_ptr<int64_t>(), seg_start.data_ptr<int64_t>(),
      seg_len.data_ptr<int64_t>(), seg_len.numel(), loc.group.data_ptr<int32_t>(), loc.set_key.data_ptr<int64_t>(),
      loc.bounds.data_ptr<int64_t>(), loc.geometry.data_ptr<int64_t>(), loc.table_offsets.data_ptr<int64_t>(),
      loc.table_offsets.numel() - 1, (int32_t)policy, state[3].data_ptr<int64_t>(), slots.data_ptr<int64_t>(),
      evicted.data_ptr<int64_t>(), filled.data_ptr<uint8_t>(),
      reinterpret_cast<unsigned long long*>(state[4].data_ptr<int64_t>()),
      reinterpret_cast<unsigned long long*>(touched.data_ptr<int64_t>()), storage, cache, (int32_t)precision,
      (int32_t)dim, rb, stochastic, (uint32_t)step_key, (int32_t)purpose, c10::cuda::getCurrentCUDAStream()),
      "process");
  state[3] += (loc.bounds.slice(0, 1) - loc.bounds.slice(0, 0, -1));  // clocks tick once per access
  auto wb = evicted >= 0;
  auto fill = filled.to(torch::kBool);
  auto uncached = std::get<0>(torch::_unique(loc.row.masked_select(slots < 0))).numel();
  auto stats = torch::tensor({touched.item<int64_t>(), (int64_t)uncached}, torch::kInt64);
  if (storage) {  // moved here: the events are not returned (as the CPU kernel)
    auto none = torch::empty({0}, indices.options());
    return {slots, none, none, none, none, stats};
  }
  return {slots, slots.masked_select(wb), evicted.masked_select(wb), slots.masked_select(fill),
          loc.row.masked_select(fill), stats};
}

torch::Tensor cache_probe_cuda(torch::Tensor indices, torch::Tensor table_bounds, torch::Tensor bounds,
                               torch::Tensor geometry, torch::Tensor table_offsets, int64_t policy,
                               std::vector<torch::Tensor> state, std::vector<torch::Tensor> derived) {
  using namespace mpc_cache_cuda;
  TORCH_CHECK(state.size() >= 2 && derived.size() == 5, "cache_probe_cuda: state/derived have the wrong length");
  check_cuda(state[0], torch::kInt64, "tags");
  // derived[4] (the CPU kernel's set headers) is not used on the GPU; after a move back
  // to the CPU the module rebuilds it.
  for (int k = 0; k < 4; ++k) check_cuda(derived[k], torch::kInt32, "order/set_state/index/slot_counts");
  Located loc = locate(indices, table_bounds, bounds, geometry, table_offsets);
  auto slots = torch::empty({indices.numel()}, indices.options());
  check_launch(mpc_cache_probe_cuda(state[0].data_ptr<int64_t>(), state[1].data_ptr<int64_t>(),
                                    derived[0].data_ptr<int32_t>(), derived[1].data_ptr<int32_t>(),
                                    derived[2].data_ptr<int32_t>(), policy == 0 ? 3 : 1,
                                    loc.row.data_ptr<int64_t>(),
                                    loc.set_key.data_ptr<int64_t>(), loc.group.data_ptr<int32_t>(),
                                    loc.geometry.data_ptr<int64_t>(), indices.numel(), slots.data_ptr<int64_t>(),
                                    c10::cuda::getCurrentCUDAStream()),
               "probe");
  return slots;
}

// Rare (after a load): rebuilt by the CPU code on host copies, then copied back.
void cache_rebuild_cuda(torch::Tensor geometry, int64_t policy, std::vector<torch::Tensor> state,
                        std::vector<torch::Tensor> derived) {
  std::vector<torch::Tensor> state_cpu, derived_cpu;
  for (const auto& t : state) state_cpu.push_back(t.cpu().contiguous());
  for (const auto& t : derived) derived_cpu.push_back(t.cpu().contiguous());
  cache_rebuild(geometry.cpu().contiguous(), policy, state_cpu, derived_cpu);
  for (size_t k = 0; k < derived.size(); ++k) derived[k].copy_(derived_cpu[k]);
}
