// The CPU step of `--optimizer adamw8bit-offload` (common/optim.py): AdamW (Loshchilov & Hutter, arXiv 1711.05101)
// on fp32 master weights whose two moments are kept in 8 bits, one byte per weight each, in blocks of 256 weights
// scaled by the block's largest magnitude (blockwise quantisation, Dettmers et al., arXiv 2110.02861).
//
// Per weight, with g its gradient and t the step:
//   m = beta1 * m + (1 - beta1) * g                      first moment
//   r = sqrt(beta2 * r^2 + (1 - beta2) * g^2)            r = sqrt(v): the second moment's square root
//   w = w * (1 - lr * weight_decay) - lr / (1 - beta1^t) * m / (r / sqrt(1 - beta2^t) + eps)
// torch.optim.AdamW's formula; storing sqrt(v) instead of v halves its dynamic range in bits.
//
// The 8-bit codes are small floats relative to the block's maximum x_max (x / x_max in [0, 1]): code 0 is 0, and
// code c > 0 keeps the exponent and top mantissa bits of the fp32 x / x_max, so the relative error is the same at
// every scale (at most 1/16 for m, 1/32 for r), down to 2^-15 of the block's maximum, below which a value is 0.
//   m: a sign bit and 7 bits (15 binades x 8 steps); r (never negative): 8 bits (15 binades x 16 steps).
// Encoding is integer arithmetic on the float's bits (round to nearest), with no table and no search, so the
// compiler vectorises both loops; OpenMP spreads the blocks over `threads` cores. Built by common/optim.py with g++.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {
constexpr int64_t BLOCK = 256;
constexpr uint32_t M_BITS = 3, R_BITS = 4;  // mantissa bits kept
constexpr uint32_t BINADES = 15;             // codes cover [2^-15, 1] of the block's maximum

inline float from_bits(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }
inline uint32_t to_bits(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }

// A magnitude x in [0, 1] as a code in [0, BINADES << mantissa], and back.
template <uint32_t MANTISSA>
inline uint32_t encode(float x) {
  constexpr int32_t offset = (127 - BINADES) << MANTISSA;  // the code of 2^-15, less 1 << MANTISSA
  int32_t code = int32_t((to_bits(x) + (1u << (22 - MANTISSA))) >> (23 - MANTISSA)) - offset;
  return code < 0 ? 0 : uint32_t(code);
}
template <uint32_t MANTISSA>
inline float decode(uint32_t code) {
  constexpr uint32_t offset = (127 - BINADES) << MANTISSA;
  return code ? from_bits((code + offset) << (23 - MANTISSA)) : 0.f;
}
}  // namespace

extern "C" void adamw8bit_step(float* weights, const float* grads, uint8_t* m_codes, float* m_max, uint8_t* r_codes,
                               float* r_max, int64_t n, float lr, float beta1, float beta2, float eps,
                               float weight_decay, int64_t step, int threads) {
  const float decay = 1.f - lr * weight_decay;
  const float step_size = lr / (1.f - std::pow(beta1, float(step)));
  const float inv_sqrt_bc2 = 1.f / std::sqrt(1.f - std::pow(beta2, float(step)));
  const int64_t blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t block = 0; block < blocks; block++) {
    const int64_t start = block * BLOCK, size = std::min(BLOCK, n - start);
    float* w = weights + start;
    const float* g = grads + start;
    uint8_t* mc = m_codes + start;
    uint8_t* rc = r_codes + start;
    const float m_scale = m_max[block], r_scale = r_max[block];
    float m[BLOCK], r[BLOCK], new_m_max = 0.f, new_r_max = 0.f;
#pragma omp simd reduction(max : new_m_max, new_r_max)
    for (int64_t i = 0; i < size; i++) {
      const float m_old = (mc[i] & 128 ? -m_scale : m_scale) * decode<M_BITS>(mc[i] & 127);
      const float r_old = r_scale * decode<R_BITS>(rc[i]);
      m[i] = beta1 * m_old + (1.f - beta1) * g[i];
      r[i] = std::sqrt(beta2 * r_old * r_old + (1.f - beta2) * g[i] * g[i]);
      w[i] = w[i] * decay - step_size * m[i] / (r[i] * inv_sqrt_bc2 + eps);
      new_m_max = std::max(new_m_max, std::fabs(m[i]));
      new_r_max = std::max(new_r_max, r[i]);
    }
    const float m_inv = new_m_max > 0.f ? 1.f / new_m_max : 0.f, r_inv = new_r_max > 0.f ? 1.f / new_r_max : 0.f;
#pragma omp simd
    for (int64_t i = 0; i < size; i++) {
      mc[i] = uint8_t(encode<M_BITS>(std::fabs(m[i]) * m_inv) | (m[i] < 0.f ? 128u : 0u));
      rc[i] = uint8_t(encode<R_BITS>(r[i] * r_inv));
    }
    m_max[block] = new_m_max;
    r_max[block] = new_r_max;
  }
}
