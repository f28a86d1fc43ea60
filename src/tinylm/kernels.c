/* C kernels for CPU inference, compiled on first use by kernels.py and called through ctypes.
 * Each does in one loop what PyTorch 2.13 does slowly on a CPU at decode sizes. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

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

/* LANES fp32 values in one vector register (GCC/Clang vector extensions: AVX-512's 16, AVX's
 * 8, SSE's 4), kept in registers where an array's `+=` in a loop round-trips through memory and
 * chains every add to the last one's store; and the bf16 values that widen into them. A vector
 * wider than the machine's registers is spilled: 2x slower than scalar code on AVX2. */
#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif
typedef float vfl __attribute__((vector_size(4 * LANES)));
typedef uint16_t vhl __attribute__((vector_size(2 * LANES)));
typedef uint32_t vul __attribute__((vector_size(4 * LANES)));

static inline __attribute__((always_inline)) vfl widen(const uint16_t *p) {
#if defined(__AVX512F__) /* one vpmovzxwd from memory: GCC 12 builds the vector in halves */
  return (vfl)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)p)), 16);
#elif defined(__AVX2__)
  return (vfl)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const void *)p)), 16);
#else
  vhl h;
  memcpy(&h, p, sizeof h);
  vul u = __builtin_convertvector(h, vul) << 16;
  vfl f;
  memcpy(&f, &u, sizeof f);
  return f;
#endif
}

/* dst (KEY_BLOCK) = q . k for the positions of one key block (D rows of KEY_BLOCK), LANES
 * positions at a time in 4 partial sums over d: one accumulator is a chain of D dependent adds
 * (4 cycles each), which was the loop's limit. */
static inline void block_scores(const uint16_t *block, const float *q, int64_t D, float *dst) {
  for (int h = 0; h < KEY_BLOCK; h += LANES) {
    const uint16_t *k = block + h;
    vfl s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    int64_t d = 0;
    for (; d + 4 <= D; d += 4) {
      s0 += q[d] * widen(k + d * KEY_BLOCK);
      s1 += q[d + 1] * widen(k + (d + 1) * KEY_BLOCK);
      s2 += q[d + 2] * widen(k + (d + 2) * KEY_BLOCK);
      s3 += q[d + 3] * widen(k + (d + 3) * KEY_BLOCK);
    }
    for (; d < D; ++d) s0 += q[d] * widen(k + d * KEY_BLOCK);
    vfl s = (s0 + s1) + (s2 + s3);
    memcpy(dst + h, &s, sizeof s);
  }
}

/* acc (D) = sum over t in t0..S-1 of p[t] v[t] (v: rows of D bf16). Rows are read front to
 * back into NC = D / LANES accumulators held in registers (NC a constant where this is
 * inlined), two sets of them (even and odd t), so the adds do not wait on each other. */
static inline __attribute__((always_inline)) void weigh_rows(const uint16_t *v, const float *p,
                                                             int64_t t0, int64_t S, float *acc,
                                                             const int NC) {
  const int64_t D = LANES * NC;
  vfl a[NC], b[NC];
  for (int c = 0; c < NC; ++c) a[c] = b[c] = (vfl){0};
  int64_t t = t0;
  for (; t + 2 <= S; t += 2)
    for (int c = 0; c < NC; ++c) {
      a[c] += p[t] * widen(v + t * D + LANES * c);
      b[c] += p[t + 1] * widen(v + (t + 1) * D + LANES * c);
    }
  if (t < S)
    for (int c = 0; c < NC; ++c) a[c] += p[t] * widen(v + t * D + LANES * c);
  for (int c = 0; c < NC; ++c) {
    vfl s = a[c] + b[c];
    memcpy(acc + LANES * c, &s, sizeof s);
  }
}

static inline void weigh_values(const uint16_t *v, const float *p, int64_t t0, int64_t S,
                                int64_t D, float *acc) {
  switch (D) { /* the usual head sizes get their own unrolled loop */
    case 32: weigh_rows(v, p, t0, S, acc, 32 / LANES); return;
    case 64: weigh_rows(v, p, t0, S, acc, 64 / LANES); return;
    case 128: weigh_rows(v, p, t0, S, acc, 128 / LANES); return;
  }
  for (int64_t d = 0; d < D; ++d) acc[d] = 0.f;
  for (int64_t t = t0; t < S; ++t)
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] += p[t] * bf16_to_float(v[t * D + d]);
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
  if (cos) { /* roll(x, D/2) in two halves: a `% D` per element, an integer division GCC
               * cannot vectorize, was most of a short row's time */
    const int64_t h = D / 2;
    for (int64_t d = 0; d < D; ++d) tmp[d] = x[d];
    for (int64_t d = 0; d < h; ++d) x[d] = tmp[d] * cos[d] + tmp[d + h] * sin[d];
    for (int64_t d = h; d < D; ++d) x[d] = tmp[d] * cos[d] + tmp[d - h] * sin[d];
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
          block_scores(block, qj, D, score + j * L + blk * KEY_BLOCK);
        }
      }
      for (int64_t j = 0; j < G; ++j) {
        float *sj = score + j * L, max = -INFINITY, total = 0.f;
#pragma omp simd reduction(max : max) /* else one scalar max after another, 4 cycles each */
        for (int64_t t = t0; t < S; ++t) max = sj[t] > max ? sj[t] : max;
        for (int64_t t = t0; t < S; ++t) {
          sj[t] = expf(sj[t] - max);
          total += sj[t];
        }
        sum[j] = total;
      }
      for (int64_t j = 0; j < G; ++j)
        weigh_values(vr, score + j * L, t0, S, D, acc + j * D);
      for (int64_t j = 0; j < G; ++j) {
        uint16_t *o = out + (b * H + g * G + j) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = float_to_bf16(acc[j * D + d] / sum[j]);
      }
    }
    free(score);
  }
}

/* rms_norm_backward: the gradients of rms_norm (contiguous rows of C values, w fp32 or NULL)
 * for the output's gradient g, x and g bf16 or fp32 (dx the same), in fp32. With r = 1 /
 * sqrt(mean(x^2) + eps) recomputed and x^ = x r: dx = r (g w - x^ mean(g w x^)), and the
 * weight's gradient sum over rows of g x^ added into dw (threads x C fp32, a row of partial
 * sums per thread, zeroed by the caller; NULL: not wanted). One pass over x and g where
 * PyTorch 2.13 traces about ten. */
void rms_norm_backward(const void *x, const void *g, const float *w, void *dx, float *dw,
                       int64_t rows, int64_t C, float eps, int bf16, int threads) {
#pragma omp parallel num_threads(threads) if (rows > 64)
  {
    float *xf = malloc(sizeof(float) * 2 * C), *gf = xf + C;
    float *dwt = dw ? dw + (int64_t)omp_get_thread_num() * C : NULL;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      if (bf16) {
        const uint16_t *xr = (const uint16_t *)x + r * C, *gr = (const uint16_t *)g + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          xf[c] = bf16_to_float(xr[c]);
          gf[c] = bf16_to_float(gr[c]);
        }
      } else {
        memcpy(xf, (const float *)x + r * C, sizeof(float) * C);
        memcpy(gf, (const float *)g + r * C, sizeof(float) * C);
      }
      float sq = 0.f, dot = 0.f;
#pragma omp simd reduction(+ : sq, dot)
      for (int64_t c = 0; c < C; ++c) {
        sq += xf[c] * xf[c];
        dot += gf[c] * (w ? w[c] : 1.f) * xf[c];
      }
      const float inv = 1.f / sqrtf(sq / C + eps), m = dot * inv * inv / C;
      if (dwt) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) dwt[c] += gf[c] * xf[c] * inv;
      }
      if (bf16) {
        uint16_t *o = (uint16_t *)dx + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c)
          o[c] = float_to_bf16(inv * (gf[c] * (w ? w[c] : 1.f) - xf[c] * m));
      } else {
        float *o = (float *)dx + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[c] = inv * (gf[c] * (w ? w[c] : 1.f) - xf[c] * m);
      }
    }
    free(xf);
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

/* int8_linear and bf16_linear: out[r, n] = scale[n] * sum_k x[r, k] w[n, k] (+ bias[n])
 * (+ res[r, n]), for rows of x in bf16 or fp32 (out and res in x's dtype), computed in fp32.
 * A decode step's matmuls read each weight once from memory for all its rows, so their speed is
 * the weights' bytes: int8 reads a quarter of fp32's, bf16 half. PyTorch 2.13's own int8 kernel
 * (_weight_int8pack_mm) takes bf16 activations, which a CPU without native bf16 emulates, one
 * row at a time, and its bf16 matmuls there are emulated too (10-20x slower than fp32).
 *
 * int8: weights with one fp32 scale per output row. With AVX2, each row of x is rounded to
 * int16 with a scale of its own (absmax / Q: 15 bits, 250 times finer than bf16's 8) and every
 * 16 weights, widened to int16 once in a register, are multiplied into ROWS rows by one
 * _mm256_madd_epi16 each (16 products summed into 8 int32 lanes). Q is kept low enough that a
 * lane's K / 8 products of at most 127 Q cannot overflow int32, so the sums are exact integers
 * whatever the order they are added in. Without AVX2 (or a K not a multiple of 16), and for
 * the last of an odd number of output rows, it is a plain fp32 loop.
 * bf16 (scale NULL): every 16 weights are one load, widened to fp32 by a shift (the even
 * ones) and a mask (the odd ones: a bf16 is the top half of an fp32), each multiplied by the
 * matching 8 of x, whose rows are widened once and split into even and odd columns per 16, by
 * an FMA; a K not a multiple of 16 ends in a scalar loop.
 *
 * Blocking: the output rows are split among the threads, a contiguous range each, walked in
 * panels of `panel` weight rows (0: as many as fit in PANEL_BYTES, a quarter of a 512 KB L2):
 * for each panel, every group of ROWS rows of x meets every weight row of the panel in a
 * register tile of OUTS weight rows by ROWS rows of x. A weight is read from memory once per
 * call, from L2 once per ROWS rows of x, and x once per panel. panel = OUTS is the loop order
 * before blocking (all of x past each pair of weight rows: for a 500-row prompt 1.5 MB of
 * int16 per pair against the down projection, out of L2), which the tests hold the blocked
 * order to, bit for bit.
 * glu: SwiGLU's gate and up projections in one matmul, their rows interleaved (gate row i at
 * w row 2i, up row i at 2i + 1, so that one tile computes both): out[r, i] = silu(gate) up,
 * (rows, N / 2), and the (rows, N) projection never leaves the registers.
 * x: (rows, K) contiguous; w: (N, K) contiguous; out, res: (rows, N) contiguous. */

#define ROWS 4
#define OUTS 2
#define PANEL_BYTES (128 << 10)
#define PREFETCH 4 /* tiles ahead: see prefetch_ahead */

static inline float dot_i8(const int8_t *w, const float *x, int64_t K) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < K; ++k) s += (float)w[k] * x[k];
  return s;
}

static inline float dot_bf16(const uint16_t *w, const float *x, int64_t K) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < K; ++k) s += bf16_to_float(w[k]) * x[k];
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

static inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* Asks for the weights PREFETCH tiles ahead of `at` (a tile is `tile` elements). A thread's
 * weight rows are one contiguous range, but a tile reads them as OUTS streams a row apart,
 * each a few lines long before the next tile's: the CPU's own prefetcher, which follows
 * long streams, left one thread reading memory at 6.5 GB/s on a decode step's int8 matmuls,
 * 9 with this (bf16: 8.7 and 10). */
#define prefetch_ahead(at, tile) \
  _mm_prefetch((const char *)((at) + PREFETCH * (tile)), _MM_HINT_T0)

/* acc += madd(w, x), in asm so that the madd's product goes to a temporary and straight into
 * its accumulator: GCC 12, given the intrinsics, ran a tile's madds before their adds, which
 * needs a second register per accumulator, and spilled accumulators to the stack. */
static inline __attribute__((always_inline)) __m256i madd_into(__m256i acc, __m256i w,
                                                               __m256i x) {
  __m256i t;
  __asm__("vpmaddwd %[x], %[w], %[t]\n\tvpaddd %[t], %[acc], %[acc]"
          : [acc] "+x"(acc), [t] "=&x"(t)
          : [w] "x"(w), [x] "x"(x));
  return acc;
}

/* O weight rows (K apart) times R int16 rows of x (K apart), K a multiple of 16, O and R
 * constants at each call: the integer sums into dst[j][r]. The loops over j and r are
 * unrolled before GCC decides what lives in registers: left to its later unrolling, the
 * accumulator array stayed in memory, stored on every step. */
static inline __attribute__((always_inline)) void tile_int8(
    const int8_t *w, int64_t K, const int16_t *x, const int O, const int R,
    float dst[OUTS][ROWS]) {
  __m256i acc[OUTS][ROWS];
#pragma GCC unroll 8
  for (int j = 0; j < O; ++j)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[j][r] = _mm256_setzero_si256();
  for (int64_t k = 0; k < K; k += 16) {
    if ((k & 63) == 0) /* once per 64-byte line of each weight row */
#pragma GCC unroll 8
      for (int j = 0; j < O; ++j) prefetch_ahead(w + j * K + k, O * K);
    __m256i wv[OUTS];
#pragma GCC unroll 8
    for (int j = 0; j < O; ++j)
      wv[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + j * K + k)));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + r * K + k));
#pragma GCC unroll 8
      for (int j = 0; j < O; ++j) acc[j][r] = madd_into(acc[j][r], wv[j], xv);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < O; ++j)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) dst[j][r] = (float)hsum_i32(acc[j][r]);
}

/* O bf16 weight rows (K apart) times R fp32 rows of x split by 16 into even and odd columns
 * (K16 apart), over the first K16 columns: the dot products into dst[j][r]. Each 16 columns of
 * x are loaded once per step and each weight row widened once per step, into O x R pairs of
 * FMAs (2 x 4 ran fastest of the tiles tried, 3 x 3 and 4 x 2 included). */
static inline __attribute__((always_inline)) void tile_bf16(
    const uint16_t *w, int64_t K, const float *xe, int64_t K16, const int O, const int R,
    float dst[OUTS][ROWS]) {
  const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
  __m256 acc[OUTS][ROWS], odd_acc[OUTS][ROWS];
#pragma GCC unroll 8
  for (int j = 0; j < O; ++j)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[j][r] = odd_acc[j][r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K16; k += 16) {
    if ((k & 31) == 0) /* once per 64-byte line of each weight row */
#pragma GCC unroll 8
      for (int j = 0; j < O; ++j) prefetch_ahead(w + j * K + k, O * K);
    __m256 xa[ROWS], xb[ROWS];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      xa[r] = _mm256_loadu_ps(xe + r * K16 + k);
      xb[r] = _mm256_loadu_ps(xe + r * K16 + k + 8);
    }
#pragma GCC unroll 8
    for (int j = 0; j < O; ++j) {
      const __m256i v = _mm256_loadu_si256((const __m256i *)(w + j * K + k));
      const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v, high));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        if (R > 2) {
          acc[j][r] = _mm256_fmadd_ps(odd, xb[r], _mm256_fmadd_ps(even, xa[r], acc[j][r]));
        } else { /* two chains per output: one chain of two FMAs per step would be
                  * latency-bound with so few outputs (one row: 8 cycles a step, slower than
                  * memory) */
          acc[j][r] = _mm256_fmadd_ps(even, xa[r], acc[j][r]);
          odd_acc[j][r] = _mm256_fmadd_ps(odd, xb[r], odd_acc[j][r]);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < O; ++j)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      dst[j][r] = hsum_ps(R > 2 ? acc[j][r] : _mm256_add_ps(acc[j][r], odd_acc[j][r]));
}
#endif

/* What one call multiplies: x prepared once (below), the weights, and the epilogue's inputs. */
typedef struct {
  int64_t rows, K, N;
  const int8_t *w8;   /* int8 weights, or NULL */
  const uint16_t *w16; /* bf16 weights, or NULL */
  const float *xf;    /* x widened to fp32, (rows, K) */
  const int16_t *xq;  /* int8, quantized: x rounded to int16, (rows, K); else NULL */
  const float *xs;    /* per row: what one int16 step of x is worth */
  const float *xe;    /* bf16 with AVX2: x's first K16 columns split even/odd per 16 */
  int64_t K16;
  const float *scale, *bias;
  const void *res;
  void *out;
  int bf16, glu;
} Matmul;

/* The dot products of weight rows n0..n0+outs by rows r0..r0+R of x into sums[j][r]. */
static inline void tile(const Matmul *m, int64_t n0, int64_t outs, int64_t r0, int64_t R,
                        float sums[OUTS][ROWS]) {
  const int64_t K = m->K;
#ifdef __AVX2__
  if (m->xq && outs == OUTS) {
    const int8_t *wb = m->w8 + n0 * K;
    const int16_t *xb = m->xq + r0 * K;
    switch (R) {
      case 1: tile_int8(wb, K, xb, OUTS, 1, sums); break;
      case 2: tile_int8(wb, K, xb, OUTS, 2, sums); break;
      case 3: tile_int8(wb, K, xb, OUTS, 3, sums); break;
      default: tile_int8(wb, K, xb, OUTS, 4, sums); break;
    }
    for (int64_t j = 0; j < OUTS; ++j)
      for (int64_t r = 0; r < R; ++r) sums[j][r] *= m->xs[r0 + r];
    return;
  }
  if (m->xe) {
    const uint16_t *wb = m->w16 + n0 * K;
    const float *xb = m->xe + r0 * m->K16;
#define TILE_BF16(O)                                                            \
  switch (R) {                                                                  \
    case 1: tile_bf16(wb, K, xb, m->K16, O, 1, sums); break;                    \
    case 2: tile_bf16(wb, K, xb, m->K16, O, 2, sums); break;                    \
    case 3: tile_bf16(wb, K, xb, m->K16, O, 3, sums); break;                    \
    default: tile_bf16(wb, K, xb, m->K16, O, 4, sums); break;                   \
  }
    if (outs == OUTS) {
      TILE_BF16(OUTS)
    } else {
      TILE_BF16(1)
    }
#undef TILE_BF16
    for (int64_t j = 0; j < outs; ++j) /* the columns after K16 */
      for (int64_t r = 0; r < R; ++r)
        sums[j][r] += dot_bf16(wb + j * K + m->K16, m->xf + (r0 + r) * K + m->K16,
                               K - m->K16);
    return;
  }
#endif
  for (int64_t j = 0; j < outs; ++j)
    for (int64_t r = 0; r < R; ++r)
      sums[j][r] = m->w8 ? dot_i8(m->w8 + (n0 + j) * K, m->xf + (r0 + r) * K, K)
                         : dot_bf16(m->w16 + (n0 + j) * K, m->xf + (r0 + r) * K, K);
}

/* out for the tile's sums: y = sum scale[n] + bias[n] (+ res), or with glu the pair
 * (gate, up) of output column n0 / 2 as silu(gate) up. */
static inline void store(const Matmul *m, int64_t n0, int64_t outs, int64_t r0, int64_t R,
                         float sums[OUTS][ROWS]) {
  const int64_t N = m->N;
  const float *scale = m->scale, *bias = m->bias;
  if (m->glu) { /* outs is 2 */
    for (int64_t r = 0; r < R; ++r) {
      const float g = sums[0][r] * (scale ? scale[n0] : 1.f) + (bias ? bias[n0] : 0.f);
      const float u = sums[1][r] * (scale ? scale[n0 + 1] : 1.f) + (bias ? bias[n0 + 1] : 0.f);
      const float y = g / (1.f + expf(-g)) * u;
      const int64_t at = (r0 + r) * (N / 2) + n0 / 2;
      if (m->bf16) ((uint16_t *)m->out)[at] = float_to_bf16(y);
      else ((float *)m->out)[at] = y;
    }
    return;
  }
  for (int64_t j = 0; j < outs; ++j) {
    const int64_t n = n0 + j;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t at = (r0 + r) * N + n;
      float y = sums[j][r] * (scale ? scale[n] : 1.f) + (bias ? bias[n] : 0.f);
      if (m->bf16) {
        if (m->res) y += bf16_to_float(((const uint16_t *)m->res)[at]);
        ((uint16_t *)m->out)[at] = float_to_bf16(y);
      } else {
        if (m->res) y += ((const float *)m->res)[at];
        ((float *)m->out)[at] = y;
      }
    }
  }
}

/* The blocked loop nest (see above), on `threads` threads. */
static void run(const Matmul *m, int64_t panel, int64_t weight_bytes, int threads) {
  const int64_t blocks = (m->N + OUTS - 1) / OUTS;
  int64_t pb = panel > 0 ? (panel + OUTS - 1) / OUTS : PANEL_BYTES / (OUTS * m->K * weight_bytes);
  pb = pb > 0 ? pb : 1;
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t lo = blocks * t / T, hi = blocks * (t + 1) / T;
    for (int64_t p0 = lo; p0 < hi; p0 += pb) {
      const int64_t p1 = p0 + pb < hi ? p0 + pb : hi;
      for (int64_t r0 = 0; r0 < m->rows; r0 += ROWS) {
        const int64_t R = m->rows - r0 < ROWS ? m->rows - r0 : ROWS;
        for (int64_t blk = p0; blk < p1; ++blk) {
          const int64_t n0 = blk * OUTS, outs = m->N - n0 < OUTS ? m->N - n0 : OUTS;
          float sums[OUTS][ROWS];
          tile(m, n0, outs, r0, R, sums);
          store(m, n0, outs, r0, R, sums);
        }
      }
    }
  }
}

/* A buffer for x on a cache line's boundary: 32-byte loads that straddle two lines (half of
 * them, from malloc's 16-byte alignment) cost the bf16 tile a quarter of its speed. */
static void *aligned(size_t bytes) {
  return aligned_alloc(64, (bytes + 63) / 64 * 64);
}

/* Row r of x (bf16 or fp32) widened into xf (K floats); with q, also rounded to int16 with
 * the row's own step (returned): absmax / Q, Q the largest that keeps a lane's K / 8 products
 * of at most 127 Q within int32. The same values as lrintf in a scalar loop (the ties round
 * to even), eight at a time: the scalar loop, a libm call per value, took a sixth of a
 * 500-row matmul's time. */
static float prepare_row(const void *x, int64_t r, int64_t K, int bf16, float *xf, int16_t *q) {
  const uint16_t *xh = (const uint16_t *)x + r * K;
  const float *xw = (const float *)x + r * K;
  int64_t k = 0;
  float m = 0.f;
#ifdef __AVX2__
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 mv = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    const __m256 v = bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(
                                _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(xh + k))), 16))
                          : _mm256_loadu_ps(xw + k);
    _mm256_storeu_ps(xf + k, v);
    mv = _mm256_max_ps(_mm256_andnot_ps(sign, v), mv);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, mv);
  for (int i = 0; i < 8; ++i) m = lanes[i] > m ? lanes[i] : m;
#endif
  for (; k < K; ++k) {
    xf[k] = bf16 ? bf16_to_float(xh[k]) : xw[k];
    m = fabsf(xf[k]) > m ? fabsf(xf[k]) : m;
  }
  if (!q) return 1.f;
  const double limit = 2147483647.0 / (127.0 * (double)(K / 8 + 1));
  const float Q = limit < 32767.0 ? (float)limit : 32767.f;
  const float step = m > 0.f ? m / Q : 1.f, inv = 1.f / step;
  k = 0;
#ifdef __AVX2__
  const __m256 iv = _mm256_set1_ps(inv);
  for (; k + 16 <= K; k += 16) { /* cvtps rounds as lrintf does: to nearest, ties to even */
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xf + k), iv));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xf + k + 8), iv));
    const __m256i ab = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), _MM_SHUFFLE(3, 1, 2, 0));
    _mm256_storeu_si256((__m256i *)(q + k), ab);
  }
#endif
  for (; k < K; ++k) q[k] = (int16_t)lrintf(xf[k] * inv);
  return step;
}

void int8_linear(const void *x, int64_t rows, int64_t K, const int8_t *w, const float *scale,
                 int64_t N, const float *bias, const void *res, void *out, int bf16, int glu,
                 int64_t panel, int threads) {
  /* x widened to fp32 once, and with AVX2 rounded to int16: 8 rows of 1536 are 72 KB */
  float *xf = aligned(((sizeof(float) + sizeof(int16_t)) * rows * K + sizeof(float) * rows));
  int16_t *xq = (int16_t *)(xf + rows * K);
  float *xs = (float *)(xq + rows * K); /* per row: what one int16 step of x is worth */
  int quantized = 0;
#ifdef __AVX2__
  quantized = K % 16 == 0;
#endif
#pragma omp parallel for num_threads(threads) if (rows * K > (1 << 16))
  for (int64_t r = 0; r < rows; ++r)
    xs[r] = prepare_row(x, r, K, bf16, xf + r * K, quantized ? xq + r * K : NULL);
  const Matmul m = {rows, K, N, w, NULL, xf, quantized ? xq : NULL, xs, NULL, 0,
                    scale, bias, res, out, bf16, glu};
  run(&m, panel, 1, threads);
  free(xf);
}

void bf16_linear(const void *x, int64_t rows, int64_t K, const uint16_t *w, int64_t N,
                 const float *bias, const void *res, void *out, int bf16, int glu,
                 int64_t panel, int threads) {
  const int64_t K16 = K / 16 * 16;
  float *buf = aligned(sizeof(float) * rows * (K16 + K)), *xe = NULL;
  float *xf = buf + rows * K16; /* both on a line's boundary: K16 is a multiple of 16 */
#ifdef __AVX2__
  xe = buf;
#endif
#pragma omp parallel for num_threads(threads) if (rows * K > (1 << 16))
  for (int64_t r = 0; r < rows; ++r) {
    prepare_row(x, r, K, bf16, xf + r * K, NULL);
    for (int64_t k = 0; xe && k < K16; k += 16)
      for (int i = 0; i < 8; ++i) {
        xe[r * K16 + k + i] = xf[r * K + k + 2 * i];
        xe[r * K16 + k + 8 + i] = xf[r * K + k + 2 * i + 1];
      }
  }
  const Matmul m = {rows, K, N, NULL, w, xf, NULL, NULL, xe, K16, NULL, bias, res, out, bf16,
                    glu};
  run(&m, panel, 2, threads);
  free(buf);
}
