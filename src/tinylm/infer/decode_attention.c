/* One decode step of attention over a bf16 KV cache, accumulating in fp32.
 *
 * PyTorch's CPU attention is memory-bound when decoding (one query row per sequence reads every
 * cached key and value), and it is several times slower on bf16 keys and values than on fp32, so
 * the cache could not shrink to half the bytes. This loop reads bf16, computes in fp32, and is
 * compiled by tinylm/infer/kernels.py on first use. Same result as
 *     softmax(q k^T * scale, masked before start[b]) v
 * for every (batch row b, head h), one OpenMP task per (b, h).
 *
 * q:   fp32, element (b, h, d) at q[b * q_sb + h * q_sh + d]
 * k,v: bf16 bits, element (b, h, t, d) at k[b * kv_sb + h * kv_sh + t * D + d], t < S
 * start: per row, the first position attended (left padding before it)
 * out: fp32 (B, H, D) contiguous
 */
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

void decode_attention(const float *q, const uint16_t *k, const uint16_t *v, const int64_t *start,
                      float *out, int64_t B, int64_t H, int64_t S, int64_t D, int64_t q_sb,
                      int64_t q_sh, int64_t kv_sb, int64_t kv_sh, float scale, int threads) {
#pragma omp parallel num_threads(threads)
  {
    float *score = malloc(sizeof(float) * (S + D)), *acc = score + S;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < B * H; ++i) {
      const int64_t b = i / H, h = i % H, t0 = start[b];
      const float *qi = q + b * q_sb + h * q_sh;
      const uint16_t *kr = k + b * kv_sb + h * kv_sh, *vr = v + b * kv_sb + h * kv_sh;
      float max = -INFINITY, sum = 0.f;
      for (int64_t t = t0; t < S; ++t) {
        const uint16_t *kt = kr + t * D;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += qi[d] * bf16_to_float(kt[d]);
        score[t] = dot * scale;
        if (score[t] > max) max = score[t];
      }
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
