// DLRM's dot interaction on the CPU, forward and backward in one pass over each
// sample (threads of at::parallel_for over samples). The pure-PyTorch twin and the
// exact definition are mpc.model.dot_interaction / DotInteraction.
//
// Z = [x; e_1; ...; e_T] (n = T + 1 vectors of D floats per sample).
//   forward:  out = [x | z_i . z_j for i > j, in torch.tril_indices(n, n, -1) order]
//   backward: S_ij = S_ji = dL/d(z_i . z_j), S_ii = 0; dL/dz_i = sum_j S_ij z_j, and
//             dL/dx = grad[:, :D] + dL/dz_0.
// torch computes the same with a cat, two bmm and a gather per pass, each re-reading
// the (B, n, n) products from memory; here a sample's Z stays in L1.
//
// Determinism: every sample is independent and each sum runs over d (forward) or j
// (backward) in ascending order, so no result depends on the thread count. With AVX2
// the sums use fused multiply-adds (8 lanes: 8 dots, or 8 of the D components, at a
// time); the scalar loops do not, so the two differ in the last bits (tests compare
// both with torch within fp32 tolerance).
//
// export: dot_interaction_forward dot_interaction_backward
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MPC_INTERACTION_AVX2 1
#endif

namespace mpc_interaction {
using torch::Tensor;

constexpr int64_t kGrain = 64;  // samples per task

void check(const Tensor& x, const Tensor& emb) {
  TORCH_CHECK(x.device().is_cpu() && emb.device().is_cpu(), "dot_interaction: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && emb.scalar_type() == torch::kFloat32,
              "dot_interaction: float32 only");
  TORCH_CHECK(x.dim() == 2 && emb.dim() == 3 && emb.size(0) == x.size(0) && emb.size(2) == x.size(1),
              "dot_interaction: x must be (B, D) and emb (B, T, D); got ", x.sizes(), " and ", emb.sizes());
}

// Sample b's vectors z_0 = x, z_i = e[i - 1] (i < n), transposed with row stride np:
// zt[d * np + i] = z_i[d] (columns n..np-1 are left as they are: zero).
inline void load_transposed(const float* x, const float* e, int64_t n, int64_t np, int64_t D, float* zt) {
  for (int64_t d = 0; d < D; ++d) zt[d * np] = x[d];
  for (int64_t i = 1; i < n; ++i) {
    const float* zi = e + (i - 1) * D;
    for (int64_t d = 0; d < D; ++d) zt[d * np + i] = zi[d];
  }
}

}  // namespace mpc_interaction

// x (B, D), emb (B, T, D) -> (B, D + n(n-1)/2), n = T + 1.
torch::Tensor dot_interaction_forward(torch::Tensor x, torch::Tensor emb) {
  using namespace mpc_interaction;
  check(x, emb);
  x = x.contiguous();
  emb = emb.contiguous();
  const int64_t B = x.size(0), D = x.size(1), n = emb.size(1) + 1, P = n * (n - 1) / 2;
  auto out = torch::empty({B, D + P}, x.options());
  const float *xp = x.data_ptr<float>(), *ep = emb.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t np = (n + 7) / 8 * 8;  // zt's row stride: whole 8-lane blocks (padding zeroed)
  at::parallel_for(0, B, kGrain, [&](int64_t lo, int64_t hi) {
    std::vector<float> zt(D * np, 0.0f), acc(np);
    for (int64_t b = lo; b < hi; ++b) {
      const float *xb = xp + b * D, *eb = ep + b * (n - 1) * D;
      float* ob = op + b * (D + P);
      load_transposed(xb, eb, n, np, D, zt.data());
      for (int64_t d = 0; d < D; ++d) ob[d] = xb[d];
      float* dots = ob + D;
      for (int64_t i = 1; i < n; ++i) {  // row i: z_i . z_j for j < i, summed over d in order
        float* row = dots + i * (i - 1) / 2;
#ifdef MPC_INTERACTION_AVX2
        for (int64_t jb = 0; jb < i; jb += 8) {
          const float* zi = zt.data() + i;
          const float* zj = zt.data() + jb;
          __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;  // four chains: d mod 4
          int64_t d = 0;
          for (; d + 4 <= D; d += 4) {
            a0 = _mm256_fmadd_ps(_mm256_set1_ps(zi[d * np]), _mm256_loadu_ps(zj + d * np), a0);
            a1 = _mm256_fmadd_ps(_mm256_set1_ps(zi[(d + 1) * np]), _mm256_loadu_ps(zj + (d + 1) * np), a1);
            a2 = _mm256_fmadd_ps(_mm256_set1_ps(zi[(d + 2) * np]), _mm256_loadu_ps(zj + (d + 2) * np), a2);
            a3 = _mm256_fmadd_ps(_mm256_set1_ps(zi[(d + 3) * np]), _mm256_loadu_ps(zj + (d + 3) * np), a3);
          }
          for (; d < D; ++d) a0 = _mm256_fmadd_ps(_mm256_set1_ps(zi[d * np]), _mm256_loadu_ps(zj + d * np), a0);
          const __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
          if (jb + 8 <= i) {
            _mm256_storeu_ps(row + jb, a);
          } else {
            _mm256_storeu_ps(acc.data(), a);
            for (int64_t j = jb; j < i; ++j) row[j] = acc[j - jb];
          }
        }
#else
        float* __restrict a = acc.data();
        for (int64_t j = 0; j < i; ++j) a[j] = 0.0f;
        for (int64_t d = 0; d < D; ++d) {
          const float zid = zt[d * np + i];
          const float* __restrict col = zt.data() + d * np;
          for (int64_t j = 0; j < i; ++j) a[j] += zid * col[j];
        }
        for (int64_t j = 0; j < i; ++j) row[j] = a[j];
#endif
      }
    }
  });
  return out;
}

// grad (B, D + n(n-1)/2), x (B, D), emb (B, T, D) -> [dL/dx (B, D), dL/demb (B, T, D)].
std::vector<torch::Tensor> dot_interaction_backward(torch::Tensor grad, torch::Tensor x, torch::Tensor emb) {
  using namespace mpc_interaction;
  check(x, emb);
  x = x.contiguous();
  emb = emb.contiguous();
  grad = grad.contiguous();
  const int64_t B = x.size(0), D = x.size(1), n = emb.size(1) + 1, P = n * (n - 1) / 2;
  TORCH_CHECK(grad.scalar_type() == torch::kFloat32 && grad.dim() == 2 && grad.size(0) == B &&
                  grad.size(1) == D + P,
              "dot_interaction_backward: grad must be float32 (", B, ", ", D + P, "), got ", grad.sizes());
  auto gx = torch::empty_like(x);
  auto ge = torch::empty_like(emb);
  const float *xp = x.data_ptr<float>(), *ep = emb.data_ptr<float>(), *gp = grad.data_ptr<float>();
  float *gxp = gx.data_ptr<float>(), *gep = ge.data_ptr<float>();
  at::parallel_for(0, B, kGrain, [&](int64_t lo, int64_t hi) {
    std::vector<float> s(n * n), acc(D);
    for (int64_t b = lo; b < hi; ++b) {
      const float *xb = xp + b * D, *eb = ep + b * (n - 1) * D, *gb = gp + b * (D + P);
      const float* gdots = gb + D;
      for (int64_t i = 0; i < n; ++i) {  // the symmetric S, zero diagonal
        s[i * n + i] = 0.0f;
        for (int64_t j = 0; j < i; ++j) s[i * n + j] = s[j * n + i] = gdots[i * (i - 1) / 2 + j];
      }
      int64_t i_first = 0;  // rows already done by the blocked AVX2 loop
#ifdef MPC_INTERACTION_AVX2
      if (D % 16 == 0) {  // four rows x 16 components at a time: 8 independent chains
        for (; i_first + 4 <= n; i_first += 4) {
          const float* s0 = s.data() + i_first * n;
          for (int64_t d0 = 0; d0 < D; d0 += 16) {
            __m256 a[8];
            for (int k = 0; k < 8; ++k) a[k] = _mm256_setzero_ps();
            for (int64_t j = 0; j < n; ++j) {
              const float* zj = (j == 0 ? xb : eb + (j - 1) * D) + d0;
              const __m256 lo = _mm256_loadu_ps(zj), hi = _mm256_loadu_ps(zj + 8);
              for (int r = 0; r < 4; ++r) {
                const __m256 sij = _mm256_set1_ps(s0[r * n + j]);
                a[2 * r] = _mm256_fmadd_ps(sij, lo, a[2 * r]);
                a[2 * r + 1] = _mm256_fmadd_ps(sij, hi, a[2 * r + 1]);
              }
            }
            for (int r = 0; r < 4; ++r) {
              const int64_t i = i_first + r;
              float* g = (i == 0 ? gxp + b * D : gep + (b * (n - 1) + i - 1) * D) + d0;
              if (i == 0) {
                a[0] = _mm256_add_ps(_mm256_loadu_ps(gb + d0), a[0]);
                a[1] = _mm256_add_ps(_mm256_loadu_ps(gb + d0 + 8), a[1]);
              }
              _mm256_storeu_ps(g, a[2 * r]);
              _mm256_storeu_ps(g + 8, a[2 * r + 1]);
            }
          }
        }
      }
#endif
      for (int64_t i = i_first; i < n; ++i) {  // dL/dz_i = sum_j S_ij z_j, j ascending
        const float* si = s.data() + i * n;
        float* g = i == 0 ? gxp + b * D : gep + (b * (n - 1) + i - 1) * D;
        const float* add = i == 0 ? gb : nullptr;  // dL/dx also takes grad[:, :D]
        int64_t d0 = 0;
#ifdef MPC_INTERACTION_AVX2
        for (; d0 + 8 <= D; d0 += 8) {
          __m256 a0 = _mm256_setzero_ps();
          for (int64_t j = 0; j < n; ++j) {
            const float* zj = (j == 0 ? xb : eb + (j - 1) * D) + d0;
            a0 = _mm256_fmadd_ps(_mm256_set1_ps(si[j]), _mm256_loadu_ps(zj), a0);
          }
          if (add) a0 = _mm256_add_ps(_mm256_loadu_ps(add + d0), a0);
          _mm256_storeu_ps(g + d0, a0);
        }
#endif
        if (d0 < D) {  // the rest of the components (all of them without AVX2)
          float* __restrict a = acc.data();
          for (int64_t d = d0; d < D; ++d) a[d] = 0.0f;
          for (int64_t j = 0; j < n; ++j) {
            const float sij = si[j];
            const float* __restrict zj = j == 0 ? xb : eb + (j - 1) * D;
            for (int64_t d = d0; d < D; ++d) a[d] += sij * zj[d];
          }
          for (int64_t d = d0; d < D; ++d) g[d] = (add ? add[d] : 0.0f) + a[d];
        }
      }
    }
  });
  return {gx, ge};
}
