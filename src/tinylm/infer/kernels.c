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

/* int8_linear: out[r, n] = scale[n] * sum_k x[r, k] w[n, k] (+ bias[n]) (+ res[r, n]), for
 * rows of x in bf16 or fp32 (out and res in x's dtype), weights int8 with one fp32 scale per
 * output row. A decode step's matmuls read each weight once from memory: int8 reads a quarter
 * of fp32's bytes, and PyTorch 2.13's own int8 kernel (_weight_int8pack_mm) takes bf16
 * activations, which a CPU without native bf16 emulates, and runs one row at a time.
 * With AVX2, each row of x is rounded to int16 with a scale of its own (absmax / Q: 15 bits,
 * 250 times finer than bf16's 8) and every 16 weights, widened to int16 once in a register,
 * are multiplied into up to ROWS rows by one _mm256_madd_epi16 each (16 products summed into
 * 8 int32 lanes): half the instructions of widening to fp32 and an FMA. Q is kept low enough
 * that a lane's K / 8 products of at most 127 Q cannot overflow int32. Without AVX2 (or a K not
 * a multiple of 16) it is a plain fp32 loop. The output rows are split among the threads.
 * glu: SwiGLU's gate and up projections in one matmul, their rows interleaved (gate row i at
 * w row 2i, up row i at 2i + 1, so that one thread computes both): out[r, i] = silu(gate) up,
 * (rows, N / 2), and the (rows, N) projection never leaves the registers.
 * x: (rows, K) contiguous; w: (N, K) contiguous; out, res: (rows, N) contiguous. */
#define ROWS 4
#define OUTS 2

static inline float dot_i8(const int8_t *w, const float *x, int64_t K) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < K; ++k) s += (float)w[k] * x[k];
  return s;
}

#ifdef __AVX2__
#include <immintrin.h>

static inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

/* OUTS weight rows times R (1..ROWS, a constant at each call) int16 rows of x, K a multiple
 * of 16: integer sums into dst[j][r]. */
static inline __attribute__((always_inline)) void block_avx2(
    const int8_t *w, int64_t K, const int16_t *x, const int R, float dst[OUTS][ROWS]) {
  __m256i acc[OUTS][ROWS];
  for (int j = 0; j < OUTS; ++j)
    for (int r = 0; r < ROWS; ++r) acc[j][r] = _mm256_setzero_si256();
  for (int64_t k = 0; k < K; k += 16) {
    __m256i wv[OUTS];
    for (int j = 0; j < OUTS; ++j)
      wv[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + j * K + k)));
    for (int r = 0; r < R; ++r) {
      const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + r * K + k));
      for (int j = 0; j < OUTS; ++j)
        acc[j][r] = _mm256_add_epi32(acc[j][r], _mm256_madd_epi16(wv[j], xv));
    }
  }
  for (int j = 0; j < OUTS; ++j)
    for (int r = 0; r < R; ++r) dst[j][r] = (float)hsum_i32(acc[j][r]);
}
#endif

void int8_linear(const void *x, int64_t rows, int64_t K, const int8_t *w, const float *scale,
                 int64_t N, const float *bias, const void *res, void *out, int bf16, int glu,
                 int threads) {
  /* x widened to fp32 once, and with AVX2 rounded to int16: 8 rows of 1536 are 72 KB */
  float *xf = malloc((sizeof(float) + sizeof(int16_t)) * rows * K + sizeof(float) * rows);
  int16_t *xq = (int16_t *)(xf + rows * K);
  float *xs = (float *)(xq + rows * K); /* per row: what one int16 step of x is worth */
  for (int64_t e = 0; e < rows * K; ++e)
    xf[e] = bf16 ? bf16_to_float(((const uint16_t *)x)[e]) : ((const float *)x)[e];
  int quantized = 0;
#ifdef __AVX2__
  quantized = K % 16 == 0;
  if (quantized) {
    const double limit = 2147483647.0 / (127.0 * (double)(K / 8 + 1));
    const float Q = limit < 32767.0 ? (float)limit : 32767.f;
    for (int64_t r = 0; r < rows; ++r) {
      float m = 0.f;
      for (int64_t k = 0; k < K; ++k) m = fabsf(xf[r * K + k]) > m ? fabsf(xf[r * K + k]) : m;
      xs[r] = m > 0.f ? m / Q : 1.f;
      const float inv = 1.f / xs[r];
      for (int64_t k = 0; k < K; ++k) xq[r * K + k] = (int16_t)lrintf(xf[r * K + k] * inv);
    }
  }
#endif
  const int64_t blocks = (N + OUTS - 1) / OUTS;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t n0 = blk * OUTS, outs = N - n0 < OUTS ? N - n0 : OUTS;
    for (int64_t r0 = 0; r0 < rows; r0 += ROWS) {
      const int64_t R = rows - r0 < ROWS ? rows - r0 : ROWS;
      float sums[OUTS][ROWS];
      int done = 0;
#ifdef __AVX2__
      if (quantized && outs == OUTS) {
        const int8_t *wb = w + n0 * K;
        const int16_t *xb = xq + r0 * K;
        switch (R) {
          case 1: block_avx2(wb, K, xb, 1, sums); break;
          case 2: block_avx2(wb, K, xb, 2, sums); break;
          case 3: block_avx2(wb, K, xb, 3, sums); break;
          default: block_avx2(wb, K, xb, 4, sums); break;
        }
        for (int64_t j = 0; j < OUTS; ++j)
          for (int64_t r = 0; r < R; ++r) sums[j][r] *= xs[r0 + r];
        done = 1;
      }
#endif
      if (!done)
        for (int64_t j = 0; j < outs; ++j)
          for (int64_t r = 0; r < R; ++r)
            sums[j][r] = dot_i8(w + (n0 + j) * K, xf + (r0 + r) * K, K);
      for (int64_t j = 0; j < outs; ++j) {
        if (glu) { /* outs is 2: the pair (gate, up) of output column n0 / 2 */
          for (int64_t r = 0; r < R; ++r) {
            const float g = sums[0][r] * scale[n0] + (bias ? bias[n0] : 0.f);
            const float u = sums[1][r] * scale[n0 + 1] + (bias ? bias[n0 + 1] : 0.f);
            const float y = g / (1.f + expf(-g)) * u;
            const int64_t at = (r0 + r) * (N / 2) + n0 / 2;
            if (bf16) ((uint16_t *)out)[at] = float_to_bf16(y);
            else ((float *)out)[at] = y;
          }
          break;
        }
        const int64_t n = n0 + j;
        for (int64_t r = 0; r < R; ++r) {
          const int64_t at = (r0 + r) * N + n;
          float y = sums[j][r] * scale[n] + (bias ? bias[n] : 0.f);
          if (bf16) {
            if (res) y += bf16_to_float(((const uint16_t *)res)[at]);
            ((uint16_t *)out)[at] = float_to_bf16(y);
          } else {
            if (res) y += ((const float *)res)[at];
            ((float *)out)[at] = y;
          }
        }
      }
    }
  }
  free(xf);
}
