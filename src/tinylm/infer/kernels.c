/* C kernels for CPU inference, compiled on first use by kernels.py and called through ctypes.
 * Each does in one loop what PyTorch 2.13 does slowly on a CPU at decode sizes. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_float(uint16_t x) {
  uint32_t bits = (uint32_t)x << 16;  /* bf16 is the top half of an fp32 */
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

static inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof bits);
  return (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16); /* round to nearest even */
}

/* decode_attention: one decode step of attention over a bf16 KV cache, accumulating in fp32.
 * PyTorch's CPU attention is memory-bound when decoding (one query row per sequence reads every
 * cached key and value), and it is several times slower on bf16 keys and values than on fp32, so
 * the cache could not shrink to half the bytes. This loop reads bf16 and computes in fp32. Same
 * result as
 *     softmax(q k^T * scale, masked before start[b]) v
 * for every (batch row b, head h), one OpenMP task per (b, h).
 *
 * q:    fp32, element (b, h, d) at q[b * q_sb + h * q_sh + d]
 * k:    bf16 bits, stored transposed: (b, h, t, d) at k[b * k_sb + h * k_sh + d * k_sd + t],
 *       so that one key dimension of all positions is contiguous and the dot products over d
 *       become sums of contiguous rows (no horizontal additions): 1.5-1.8x faster than keys
 *       stored by position
 * v:    bf16 bits, element (b, h, t, d) at v[b * v_sb + h * v_sh + t * D + d]
 * start: per row, the first position attended (left padding before it); t < S
 * out:  fp32 (B, H, D) contiguous
 */
void decode_attention(const float *q, const uint16_t *k, const uint16_t *v, const int64_t *start,
                      float *out, int64_t B, int64_t H, int64_t S, int64_t D, int64_t q_sb,
                      int64_t q_sh, int64_t k_sb, int64_t k_sh, int64_t k_sd, int64_t v_sb,
                      int64_t v_sh, float scale, int threads) {
#pragma omp parallel num_threads(threads)
  {
    float *score = malloc(sizeof(float) * (S + D)), *acc = score + S;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < B * H; ++i) {
      const int64_t b = i / H, h = i % H, t0 = start[b];
      const float *qi = q + b * q_sb + h * q_sh;
      const uint16_t *kr = k + b * k_sb + h * k_sh, *vr = v + b * v_sb + h * v_sh;
      float max = -INFINITY, sum = 0.f;
      for (int64_t t = t0; t < S; ++t) score[t] = 0.f;
      for (int64_t d = 0; d < D; ++d) {
        const uint16_t *kd = kr + d * k_sd;
        const float qd = qi[d] * scale;
#pragma omp simd
        for (int64_t t = t0; t < S; ++t) score[t] += qd * bf16_to_float(kd[t]);
      }
      for (int64_t t = t0; t < S; ++t) max = score[t] > max ? score[t] : max;
      for (int64_t t = t0; t < S; ++t) {
        score[t] = expf(score[t] - max);
        sum += score[t];
      }
      for (int64_t d = 0; d < D; ++d) acc[d] = 0.f;
      for (int64_t t = t0; t < S; ++t) {
        const uint16_t *vt = vr + t * D;
        const float p = score[t];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[d] += p * bf16_to_float(vt[d]);
      }
      for (int64_t d = 0; d < D; ++d) out[i * D + d] = acc[d] / sum;
    }
    free(score);
  }
}

/* rms_norm: out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w (w may be NULL), for rows of C values,
 * bf16 or fp32 (both x and out), computed in fp32. PyTorch 2.13's CPU rms_norm is a chain of
 * about eight ops (upcast, pow, mean, add, rsqrt, mul, mul, downcast); this is one loop.
 * Row r of x starts at (r / group) * group_stride + (r % group) * C elements, so the q and k
 * heads inside a fused qkv output (2H rows of every 3H) are read in place; out is (rows, C). */
void rms_norm(const void *x, void *out, const float *w, int64_t rows, int64_t C, int64_t group,
              int64_t group_stride, float eps, int bf16, int threads) {
#pragma omp parallel for num_threads(threads) if (rows > 64)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t at = (r / group) * group_stride + (r % group) * C;
    float sq = 0.f;
    if (bf16) {
      const uint16_t *xr = (const uint16_t *)x + at;
      uint16_t *o = (uint16_t *)out + r * C;
#pragma omp simd reduction(+ : sq)
      for (int64_t c = 0; c < C; ++c) sq += bf16_to_float(xr[c]) * bf16_to_float(xr[c]);
      const float inv = 1.f / sqrtf(sq / C + eps);
#pragma omp simd
      for (int64_t c = 0; c < C; ++c)
        o[c] = float_to_bf16(bf16_to_float(xr[c]) * inv * (w ? w[c] : 1.f));
    } else {
      const float *xr = (const float *)x + at;
      float *o = (float *)out + r * C;
#pragma omp simd reduction(+ : sq)
      for (int64_t c = 0; c < C; ++c) sq += xr[c] * xr[c];
      const float inv = 1.f / sqrtf(sq / C + eps);
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) o[c] = xr[c] * inv * (w ? w[c] : 1.f);
    }
  }
}
