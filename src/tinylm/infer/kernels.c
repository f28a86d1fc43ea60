/* C kernels for CPU inference, compiled on first use by kernels.py and called through ctypes.
 * Each does in one loop what PyTorch 2.13 does slowly on a CPU at decode sizes. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Keys are stored in blocks of KEY_BLOCK positions (kernels.py's KEY_BLOCK), one fp32 vector
 * register of scores on AVX-512. */
#define KEY_BLOCK 16

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

/* decode_attention: one decode step of attention, from the fused qkv projection's output to
 * the heads' outputs, over a bf16 KV cache, computing in fp32. With grouped-query attention
 * each of the Hk key/value heads serves G = H / Hk query heads (G = 1: plain multi-head). For
 * every (batch row b, key/value head g), one OpenMP task each:
 *   k = QK-norm (RMSNorm per head, then its weight) and rotary embedding, when given; k and v
 *       are written into the cache at position pos, once for the whole group;
 *   for each query head of the group, q likewise, and
 *   out = softmax(q k^T / sqrt(D), over positions start[b]..pos) v.
 * The group's query heads score each key block and weigh each value row while it is in cache:
 * the cache is read once per key/value head, not once per query head.
 * PyTorch's CPU attention is several times slower on bf16 keys and values than on fp32, so the
 * cache could not shrink to half the bytes; and done as PyTorch ops, the steps before it are a
 * dozen small calls per layer.
 *
 * qkv:  bf16 (B, H + 2 Hk, D) contiguous: each row's H query heads, Hk key heads, Hk value heads
 * qk_w: fp32 (2, D), q_norm's and k_norm's weights, or NULL for no QK-norm
 * cos, sin: fp32 rows of D for each batch row (rope_sb apart, 0 = one row for all), or NULL.
 *       Rotation: x * cos + roll(x, D/2) * sin, with sin's first half negated by the caller
 * k:    bf16 cache of Hk heads, keys in transposed blocks of KEY_BLOCK positions: (b, g, t, d) at
 *       k[b * k_sb + g * k_sh + (t / KEY_BLOCK) * D * KEY_BLOCK + d * KEY_BLOCK + t % KEY_BLOCK].
 *       A block's scores are sums of contiguous rows held in registers (no horizontal additions),
 *       and the blocks attended are read front to back: 1.5-1.8x faster than keys stored by
 *       position, and 15-20% faster than keys transposed whole, whose unfilled tails the CPU
 *       prefetches for nothing
 * v:    bf16 cache of Hk heads, (b, g, t, d) at v[b * v_sb + g * v_sh + t * D + d]
 * start: per row, the first position attended (left padding before it)
 * out:  bf16 (B, H, D) contiguous */
static void rms_rope(float *x, const float *w, float eps, const float *cos, const float *sin,
                     float *tmp, int64_t D) {
  if (w) {
    float sq = 0.f;
    for (int64_t d = 0; d < D; ++d) sq += x[d] * x[d];
    const float inv = 1.f / sqrtf(sq / D + eps);
    for (int64_t d = 0; d < D; ++d) x[d] *= inv * w[d];
  }
  if (cos) {
    for (int64_t d = 0; d < D; ++d) tmp[d] = x[d];
    for (int64_t d = 0; d < D; ++d) x[d] = tmp[d] * cos[d] + tmp[(d + D / 2) % D] * sin[d];
  }
}

void decode_attention(const uint16_t *qkv, int64_t B, int64_t H, int64_t Hk, int64_t D,
                      const float *qk_w, float eps, const float *cos, const float *sin,
                      int64_t rope_sb, uint16_t *k, int64_t k_sb, int64_t k_sh, uint16_t *v,
                      int64_t v_sb, int64_t v_sh, int64_t pos, const int64_t *start,
                      uint16_t *out, int threads) {
  const int64_t S = pos + 1, G = H / Hk;
  const int64_t blocks = (S + KEY_BLOCK - 1) / KEY_BLOCK, L = blocks * KEY_BLOCK;
#pragma omp parallel num_threads(threads)
  {
    /* per query head of the group: L scores, D accumulators, D of q; then k, a row, a sum */
    float *score = malloc(sizeof(float) * (G * (L + 2 * D + 1) + 2 * D)),
          *acc = score + G * L, *q = acc + G * D, *sum = q + G * D, *kn = sum + G,
          *tmp = kn + D;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < B * Hk; ++i) {
      const int64_t b = i / Hk, g = i % Hk, t0 = start[b];
      const uint16_t *row = qkv + b * (H + 2 * Hk) * D;
      const uint16_t *krow = row + (H + g) * D, *vrow = row + (H + Hk + g) * D;
      const float *c = cos ? cos + b * rope_sb : NULL, *s = sin ? sin + b * rope_sb : NULL;
      uint16_t *kr = k + b * k_sb + g * k_sh, *vr = v + b * v_sb + g * v_sh;
      for (int64_t d = 0; d < D; ++d) {
        kn[d] = bf16_to_float(krow[d]);
        vr[pos * D + d] = vrow[d];
      }
      rms_rope(kn, qk_w ? qk_w + D : NULL, eps, c, s, tmp, D);
      uint16_t *kb = kr + (pos / KEY_BLOCK) * D * KEY_BLOCK + pos % KEY_BLOCK;
      for (int64_t d = 0; d < D; ++d) kb[d * KEY_BLOCK] = float_to_bf16(kn[d]);

      const float scale = 1.f / sqrtf((float)D);
      for (int64_t j = 0; j < G; ++j) {
        float *qj = q + j * D;
        const uint16_t *qrow = row + (g * G + j) * D;
        for (int64_t d = 0; d < D; ++d) qj[d] = bf16_to_float(qrow[d]);
        rms_rope(qj, qk_w, eps, c, s, tmp, D);
        for (int64_t d = 0; d < D; ++d) qj[d] *= scale;
      }
      for (int64_t blk = t0 / KEY_BLOCK; blk < blocks; ++blk) {
        const uint16_t *block = kr + blk * D * KEY_BLOCK;
        for (int64_t j = 0; j < G; ++j) {
          const float *qj = q + j * D;
          float sc[KEY_BLOCK] = {0};
          for (int64_t d = 0; d < D; ++d) {
            const float qd = qj[d];
#pragma omp simd
            for (int u = 0; u < KEY_BLOCK; ++u)
              sc[u] += qd * bf16_to_float(block[d * KEY_BLOCK + u]);
          }
          for (int u = 0; u < KEY_BLOCK; ++u) score[j * L + blk * KEY_BLOCK + u] = sc[u];
        }
      }
      for (int64_t j = 0; j < G; ++j) {
        float *sj = score + j * L, max = -INFINITY, total = 0.f;
        for (int64_t t = t0; t < S; ++t) max = sj[t] > max ? sj[t] : max;
        for (int64_t t = t0; t < S; ++t) {
          sj[t] = expf(sj[t] - max);
          total += sj[t];
        }
        sum[j] = total;
      }
      for (int64_t e = 0; e < G * D; ++e) acc[e] = 0.f;
      for (int64_t t = t0; t < S; ++t) {
        const uint16_t *vt = vr + t * D;
        for (int64_t d = 0; d < D; ++d) tmp[d] = bf16_to_float(vt[d]);  /* widened once */
        for (int64_t j = 0; j < G; ++j) {
          const float p = score[j * L + t];
          float *aj = acc + j * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) aj[d] += p * tmp[d];
        }
      }
      for (int64_t j = 0; j < G; ++j) {
        uint16_t *o = out + (b * H + g * G + j) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = float_to_bf16(acc[j * D + d] / sum[j]);
      }
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
