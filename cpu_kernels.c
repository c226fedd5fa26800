/* FishAI's CPU matmuls for the .bin's int8 and int4 weights (cpu_kernels.py builds and loads this
 * file; nothing else uses it).
 *
 * y (M, N) = x (M, K) W^T for a decode step's few rows of x. x is quantized per block of 32 values
 * to int8 with one fp32 scale per block (d = max|x| / 127, as llama.cpp's Q8_0 quantizes the
 * activations of its Q8_0 and Q4_0 matmuls), then multiplied with the integer codes by AVX512-VNNI
 * (vpdpbusd: 64 byte products a step, summed in fp32 per block). Every output is one weight row
 * against one row of x, always in the same order: a row's result does not depend on the other rows
 * that come with it (batch-invariant) or on the thread count.
 *
 * Weight layouts (cpu_kernels.py makes them from the .bin at load):
 *   int8: codes (N, Kp) int8 row-major, Kp = K rounded up to 64, zero columns appended; fp32 scale
 *         per row: W[n, c] = code * s[n].
 *   int4: (N, Kp / 2) bytes, Kp = K rounded up to 64; in each 128 columns byte i holds column i
 *         (low nibble) and column 64 + i (high), in a last 64 columns alone column i and 32 + i; fp32
 *         scale s and s * zero per row and group of G columns (G a multiple of 64):
 *         W[n, c] = (code - z[n, g]) * s[n, g].
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && \
    defined(__AVX512VNNI__)
#define FISHAI_VNNI 1
#else
#define FISHAI_VNNI 0
#endif

/* 1 when this build has the kernels (the compiler targets AVX512-VNNI), 0 when it does not */
int fishai_caps(void) { return FISHAI_VNNI; }

#if FISHAI_VNNI

/* ROW(n) for n = 0..N-1 on `nthreads` threads; one thread runs the plain loop (GOMP_parallel costs
 * ~2 us a call even for a team of one, ~25 calls a token) */
#define FOR_ROWS(N, ROW) do { \
        if (nthreads > 1) { \
            _Pragma("omp parallel for schedule(static) num_threads(nthreads)") \
            for (int64_t n = 0; n < (N); n++) ROW(n); \
        } else { \
            for (int64_t n = 0; n < (N); n++) ROW(n); \
        } } while (0)

#define MB 8 /* at most this many rows of x per pass over a weight row: each weight vector is loaded once for them */

/* x (M, K) fp32 -> xq (M, Kp) int8 and d (M, Kp / 32) fp32: each block of 32 values as
 * round(x / d), d = max|x| / 127; zeros past K. */
static void quantize_rows(const float *x, int64_t M, int64_t K, int64_t Kp, int8_t *xq, float *d) {
    const int64_t nb = Kp / 32;
    const __m512 sign = _mm512_set1_ps(-0.0f);
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * K;
        for (int64_t b = 0; b < nb; b++) {
            float buf[32];
            const int64_t lo = b * 32, n = K - lo >= 32 ? 32 : (K - lo > 0 ? K - lo : 0);
            memset(buf, 0, sizeof buf);
            if (n > 0) memcpy(buf, xr + lo, (size_t)n * sizeof(float));
            const __m512 v0 = _mm512_loadu_ps(buf), v1 = _mm512_loadu_ps(buf + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, v0), _mm512_andnot_ps(sign, v1)));
            const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
            /* round to nearest even (the default MXCSR mode), as torch.round */
            _mm_storeu_si128((__m128i *)(xq + m * Kp + lo), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v0, inv))));
            _mm_storeu_si128((__m128i *)(xq + m * Kp + lo + 16), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v1, inv))));
            d[m * nb + b] = amax / 127.0f;
        }
    }
}

/* the scales of vpdpbusd's 16 lanes over 64 columns: block 2p's d on lanes 0-7, block 2p+1's on 8-15 */
static void pair_scales(const float *d, int64_t M, int64_t np, __m512 *dv) {
    for (int64_t i = 0; i < M * np; i++)
        dv[i] = _mm512_insertf32x8(_mm512_set1_ps(d[2 * i]), _mm256_set1_ps(d[2 * i + 1]), 1);
}

/* the sum of x's 32-blocks as quantized: sum over blocks of d * sum(xq), per row of x and per group
 * of G columns (xs, M x ng) */
static void group_sums(const int8_t *xq, const float *d, int64_t M, int64_t Kp, int64_t G, int64_t ng, float *xs) {
    const int64_t nb = Kp / 32;
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < nb; b++) {
            int sum = 0;
            for (int j = 0; j < 32; j++) sum += xq[m * Kp + b * 32 + j];
            const int64_t g = (b * 32) / G;
            xs[m * ng + (g < ng ? g : ng - 1)] += d[m * nb + b] * (float)sum;
        }
}

/* One weight row against rows m0..m0+mb-1 of x; mb is a constant where this is inlined, so the
 * accumulators stay in registers. vpdpbusd multiplies unsigned by signed bytes: the codes enter as
 * code + 128 (their sign bit flipped) and each row of x takes back 128 * its sum (corr). */
static inline __attribute__((always_inline)) void q8_rows(const int8_t *wr, const int8_t *xq, const __m512 *dv,
        const float *corr, float s, int64_t m0, const int mb, int64_t np, int64_t Kp, float *y, int64_t N) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512 acc[MB];
    for (int j = 0; j < mb; j++) acc[j] = _mm512_setzero_ps();
    for (int64_t p = 0; p < np; p++) {
        const __m512i wu = _mm512_xor_si512(_mm512_loadu_si512(wr + p * 64), flip);
        for (int j = 0; j < mb; j++) {
            const __m512i dp = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, _mm512_loadu_si512(xq + (m0 + j) * Kp + p * 64));
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), dv[(m0 + j) * np + p], acc[j]);
        }
    }
    for (int j = 0; j < mb; j++) y[(m0 + j) * N] = s * (_mm512_reduce_add_ps(acc[j]) - corr[m0 + j]);
}

void fishai_q8_mm(const float *x, int64_t M, int64_t K, const int8_t *w, int64_t Kp, const float *s, int64_t N,
                  float *y, int nthreads) {
    const int64_t nb = Kp / 32, np = Kp / 64;
    int8_t *xq = aligned_alloc(64, (size_t)(M * Kp));
    float *d = malloc(sizeof(float) * (size_t)(M * nb));
    __m512 *dv = aligned_alloc(64, sizeof(__m512) * (size_t)(M * np));
    float *corr = calloc((size_t)M, sizeof(float));
    quantize_rows(x, M, K, Kp, xq, d);
    pair_scales(d, M, np, dv);
    group_sums(xq, d, M, Kp, Kp, 1, corr);
    for (int64_t m = 0; m < M; m++) corr[m] *= 128.0f;
    #define Q8_ROW(n) do { int64_t m0 = 0; \
        for (; m0 + 4 <= M; m0 += 4) q8_rows(w + (n) * Kp, xq, dv, corr, s[n], m0, 4, np, Kp, y + (n), N); \
        for (; m0 + 2 <= M; m0 += 2) q8_rows(w + (n) * Kp, xq, dv, corr, s[n], m0, 2, np, Kp, y + (n), N); \
        for (; m0 < M; m0++) q8_rows(w + (n) * Kp, xq, dv, corr, s[n], m0, 1, np, Kp, y + (n), N); } while (0)
    FOR_ROWS(N, Q8_ROW);
    free(xq); free(d); free(dv); free(corr);
}

/* One int4 weight row against rows m0..m0+mb-1 of x. Codes 0..15 are unsigned bytes as vpdpbusd
 * wants them: one 64-byte load holds 128 columns (column i in the low nibbles, 64 + i in the high).
 * A group's columns are summed before its scale is applied once, and the zero points enter once per
 * group: s * z * (the group's sum of x). */
static inline __attribute__((always_inline)) void q4_rows(const uint8_t *wr, const float *s, const float *sz,
        int64_t ng, int64_t pp, const int8_t *xq, const __m512 *dv, const float *xs, int64_t m0, const int mb,
        int64_t np, int64_t Kp, float *y, int64_t N) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 acc[MB], part[MB];
    for (int j = 0; j < mb; j++) acc[j] = part[j] = _mm512_setzero_ps();
    __m512i hi = _mm512_setzero_si512();
    /* (a counter, not p % pp: a division per 64 columns costs as much as their products) */
    for (int64_t p = 0, g = 0, in_group = 0; p < np; p++) {
        __m512i cv;
        if (p % 2 == 0 && p + 1 < np) {
            const __m512i v = _mm512_loadu_si512(wr + p * 32);
            cv = _mm512_and_si512(v, low);
            hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        } else if (p % 2 == 0) { /* a last 64 columns alone: 32 bytes, column i low and 32 + i high */
            const __m256i v = _mm256_loadu_si256((const __m256i *)(wr + p * 32)), l4 = _mm256_set1_epi8(0x0F);
            cv = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, l4)),
                                    _mm256_and_si256(_mm256_srli_epi16(v, 4), l4), 1);
        } else {
            cv = hi;
        }
        for (int j = 0; j < mb; j++) {
            const __m512i dp = _mm512_dpbusd_epi32(_mm512_setzero_si512(), cv, _mm512_loadu_si512(xq + (m0 + j) * Kp + p * 64));
            part[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), dv[(m0 + j) * np + p], part[j]);
        }
        if (++in_group == pp || p + 1 == np) { /* the end of group g (past the last: padding, zeros) */
            in_group = 0;
            const __m512 sv = _mm512_set1_ps(s[g < ng ? g : ng - 1]);
            g++;
            for (int j = 0; j < mb; j++) {
                acc[j] = _mm512_fmadd_ps(part[j], sv, acc[j]);
                part[j] = _mm512_setzero_ps();
            }
        }
    }
    for (int j = 0; j < mb; j++) {
        float zacc = 0.0f;
        for (int64_t g = 0; g < ng; g++) zacc += sz[g] * xs[(m0 + j) * ng + g];
        y[(m0 + j) * N] = _mm512_reduce_add_ps(acc[j]) - zacc;
    }
}

void fishai_q4_mm(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t Kp, const float *s,
                  const float *sz, int64_t ng, int64_t G, int64_t N, float *y, int nthreads) {
    const int64_t nb = Kp / 32, np = Kp / 64, pp = G / 64, ldw = Kp / 2;
    int8_t *xq = aligned_alloc(64, (size_t)(M * Kp));
    float *d = malloc(sizeof(float) * (size_t)(M * nb));
    __m512 *dv = aligned_alloc(64, sizeof(__m512) * (size_t)(M * np));
    float *xs = calloc((size_t)(M * ng), sizeof(float));
    quantize_rows(x, M, K, Kp, xq, d);
    pair_scales(d, M, np, dv);
    group_sums(xq, d, M, Kp, G, ng, xs);
    #define Q4_ROW(n) do { const uint8_t *wr = w + (n) * ldw; const float *sr = s + (n) * ng, *szr = sz + (n) * ng; \
        int64_t m0 = 0; \
        for (; m0 + 8 <= M; m0 += 8) q4_rows(wr, sr, szr, ng, pp, xq, dv, xs, m0, 8, np, Kp, y + (n), N); \
        for (; m0 + 4 <= M; m0 += 4) q4_rows(wr, sr, szr, ng, pp, xq, dv, xs, m0, 4, np, Kp, y + (n), N); \
        for (; m0 + 2 <= M; m0 += 2) q4_rows(wr, sr, szr, ng, pp, xq, dv, xs, m0, 2, np, Kp, y + (n), N); \
        for (; m0 < M; m0++) q4_rows(wr, sr, szr, ng, pp, xq, dv, xs, m0, 1, np, Kp, y + (n), N); } while (0)
    FOR_ROWS(N, Q4_ROW);
    free(xq); free(d); free(dv); free(xs);
}

/* One fp16 weight row against rows m0..m0+mb-1 of fp32 x: the fp16 values converted exactly
 * (vcvtph2ps) and multiplied in fp32, two accumulators per row of x so that the FMA latency overlaps. */
static inline __attribute__((always_inline)) void f16_rows(const uint16_t *wr, const float *x, int64_t K,
        int64_t m0, const int mb, float *y, int64_t N) {
    __m512 a0[MB], a1[MB];
    for (int j = 0; j < mb; j++) a0[j] = a1[j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        const __m512 w0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wr + k)));
        const __m512 w1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wr + k + 16)));
        for (int j = 0; j < mb; j++) {
            a0[j] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + (m0 + j) * K + k), a0[j]);
            a1[j] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + (m0 + j) * K + k + 16), a1[j]);
        }
    }
    for (; k < K; k += 16) { /* the last 16 or fewer columns, masked */
        const __mmask16 mk = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        const __m512 w0 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, wr + k));
        for (int j = 0; j < mb; j++) a0[j] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(mk, x + (m0 + j) * K + k), a0[j]);
    }
    for (int j = 0; j < mb; j++) y[(m0 + j) * N] = _mm512_reduce_add_ps(_mm512_add_ps(a0[j], a1[j]));
}

/* y (M, N) = x (M, K) W^T, W (N, K) fp16 (the .bin's f16 tensor as stored), all in fp32 */
void fishai_f16_mm(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, float *y, int nthreads) {
    #define F16_ROW(n) do { int64_t m0 = 0; \
        for (; m0 + 4 <= M; m0 += 4) f16_rows(w + (n) * K, x, K, m0, 4, y + (n), N); \
        for (; m0 + 2 <= M; m0 += 2) f16_rows(w + (n) * K, x, K, m0, 2, y + (n), N); \
        for (; m0 < M; m0++) f16_rows(w + (n) * K, x, K, m0, 1, y + (n), N); } while (0)
    FOR_ROWS(N, F16_ROW);
}

#endif
