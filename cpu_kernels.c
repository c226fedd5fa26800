/* FishAI's CPU matmuls for the .bin's int8, int4 and fp16 weights, and the decode trunk that runs
 * a .bin's whole decode step on them (cpu_kernels.py builds and loads this file; nothing else uses it).
 *
 * y (M, N) = x (M, K) W^T for a decode step's few rows of x (a prefill's too). For int8/int4, x is
 * quantized per block of 32 values to int8 with one fp32 scale per block (d = max|x| / 127, as
 * llama.cpp's Q8_0 quantizes the activations of its Q8_0 and Q4_0 matmuls), then multiplied with the
 * integer codes by AVX512-VNNI (vpdpbusd: 64 byte products an instruction, summed in fp32 per block);
 * fp16 weights are converted exactly and multiplied in fp32. Every output is one weight row against
 * one row of x, always in the same order: a row's result does not depend on the other rows that come
 * with it (batch-invariant) or on the thread count.
 *
 * Weight layouts (cpu_kernels.py makes them from the .bin at load): rows in blocks of 16, one row a
 * vector lane, so that one instruction serves 16 rows, the lanes end as the 16 outputs (no
 * horizontal sums) and the weights stream through memory in order. N16 = N rounded up to 16 (zero
 * rows), Kp = K rounded up to 64 (zero columns).
 *   int8: (N16, Kp) int8, per block 64-byte vectors of 4 columns x 16 rows (4 bytes a row); fp32
 *         scale per row: W[n, c] = code * s[n].
 *   int4: (N16, Kp / 2) bytes, per block 64-byte vectors of 8 columns x 16 rows, byte t of a row =
 *         column 8v + t (low nibble) and 8v + 4 + t (high); fp32 scale s and s * zero per row and
 *         group of G columns (G a multiple of 64), 16 rows side by side per group:
 *         W[n, c] = (code - z[n, g]) * s[n, g].
 *   fp16: (N16, K) fp16, per block a column's 16 values side by side.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <omp.h>
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

/* the lanes of a 16-wide vector that hold the last n (< 16: a tail) of a row, or all 16 */
static inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

#define MB 8 /* at most this many rows of x per pass over a block: each weight vector is loaded once for them */

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

/* Int8 weights in blocks of 16 rows, the rows in the lanes (cpu_kernels.pack_int8): each 64-byte
 * vector holds 4 columns of 16 rows. One vpdpbusd multiplies them by the same 4 bytes of x
 * (broadcast) and the 16 lanes end as the 16 rows' outputs: the weights stream in order, no
 * horizontal sums, one vector of 16 row scales. vpdpbusd multiplies unsigned by signed bytes: the
 * codes enter as code + 128 (their sign bit flipped) and each row of x takes back 128 * its sum (corr). */
static inline __attribute__((always_inline)) void q8_block(const int8_t *wb, const float *s, const int8_t *xq,
        const float *d, const float *corr, int64_t m0, const int mb, int64_t Kp, float *y, int64_t ldy, int64_t n0,
        int64_t nvalid) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const int64_t nb = Kp / 32;
    __m512 acc[MB];
    for (int j = 0; j < mb; j++) acc[j] = _mm512_setzero_ps();
    for (int64_t blk = 0; blk < nb; blk++) {
        __m512i dacc[MB];
        for (int j = 0; j < mb; j++) dacc[j] = _mm512_setzero_si512();
        for (int c = 0; c < 8; c++) {  /* 8 vectors of 4 columns: the x block's 32 */
            const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(wb + (blk * 8 + c) * 64), flip);
            for (int j = 0; j < mb; j++)
                dacc[j] = _mm512_dpbusd_epi32(dacc[j], v,
                                              _mm512_set1_epi32(*(const int32_t *)(xq + (m0 + j) * Kp + blk * 32 + c * 4)));
        }
        for (int j = 0; j < mb; j++)
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dacc[j]), _mm512_set1_ps(d[(m0 + j) * nb + blk]), acc[j]);
    }
    const __mmask16 mk = tail_mask(nvalid);
    const __m512 sv = _mm512_maskz_loadu_ps(mk, s + n0);
    for (int j = 0; j < mb; j++)
        _mm512_mask_storeu_ps(y + (m0 + j) * ldy + n0, mk, _mm512_mul_ps(sv, _mm512_sub_ps(acc[j], _mm512_set1_ps(corr[m0 + j]))));
}

static void q8_mm(const float *x, int64_t M, int64_t K, const int8_t *w, int64_t Kp, const float *s, int64_t N,
                  float *y, int64_t ldy, int nthreads) {
    const int64_t nb = Kp / 32, nblocks = (N + 15) / 16;
    int8_t *xq = aligned_alloc(64, (size_t)(M * Kp));
    float *d = malloc(sizeof(float) * (size_t)(M * nb));
    float *corr = calloc((size_t)M, sizeof(float));
    quantize_rows(x, M, K, Kp, xq, d);
    group_sums(xq, d, M, Kp, Kp, 1, corr);
    for (int64_t m = 0; m < M; m++) corr[m] *= 128.0f;
    #define Q8_BLOCK(b) do { const int8_t *wb = w + (b) * 16 * Kp; const int64_t n0 = (b) * 16, nv = N - n0; \
        int64_t m0 = 0; \
        for (; m0 + 8 <= M; m0 += 8) q8_block(wb, s, xq, d, corr, m0, 8, Kp, y, ldy, n0, nv); \
        for (; m0 + 4 <= M; m0 += 4) q8_block(wb, s, xq, d, corr, m0, 4, Kp, y, ldy, n0, nv); \
        for (; m0 < M; m0++) q8_block(wb, s, xq, d, corr, m0, 1, Kp, y, ldy, n0, nv); } while (0)
    FOR_ROWS(nblocks, Q8_BLOCK);
    free(xq); free(d); free(corr);
}

/* Int4 weights in blocks of 16 rows, the rows in the lanes (cpu_kernels.pack_int4): each 64-byte
 * vector holds 8 columns of 16 rows, 4 bytes a row, byte t = column 8c + t (low nibble) and 8c + 4 + t
 * (high). One vpdpbusd then multiplies 4 columns of 16 rows by the same 4 bytes of x (broadcast),
 * and the 16 lanes end as the 16 rows' outputs: no horizontal sums, and a group's scales and zero
 * points are one vector load for 16 rows. Both nibbles enter as 16 * code (v << 4 & 0xF0 and
 * v & 0xF0, exact in int32), so one accumulator takes both; the block's x scale d / 16 undoes it.
 * ks, kz: scales and scale * zero transposed per block, (N16 / 16, ng, 16). */
static inline __attribute__((always_inline)) void q4_block(const uint8_t *wb, const float *ks, const float *kz,
        int64_t ng, int64_t G, const int8_t *xq, const float *d16, const float *xs, int64_t m0, const int mb,
        int64_t Kp, float *y, int64_t ldy, int64_t n0, int64_t nvalid) {
    const __m512i hi_mask = _mm512_set1_epi8((char)0xF0);
    const int64_t nb = Kp / 32;
    __m512 acc[4], part[4];
    for (int j = 0; j < mb; j++) acc[j] = part[j] = _mm512_setzero_ps();
    for (int64_t blk = 0, g = 0; blk < nb; blk++) {
        __m512i dacc[4];
        for (int j = 0; j < mb; j++) dacc[j] = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++) {  /* 4 vectors of 8 columns: the x block's 32 */
            const int64_t cc = blk * 4 + c;
            const __m512i v = _mm512_loadu_si512(wb + cc * 64);
            const __m512i lo = _mm512_and_si512(_mm512_slli_epi16(v, 4), hi_mask), hi = _mm512_and_si512(v, hi_mask);
            for (int j = 0; j < mb; j++) {
                const int32_t *xr = (const int32_t *)(xq + (m0 + j) * Kp + cc * 8);
                dacc[j] = _mm512_dpbusd_epi32(dacc[j], lo, _mm512_set1_epi32(xr[0]));
                dacc[j] = _mm512_dpbusd_epi32(dacc[j], hi, _mm512_set1_epi32(xr[1]));
            }
        }
        for (int j = 0; j < mb; j++)
            part[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dacc[j]), _mm512_set1_ps(d16[(m0 + j) * nb + blk]), part[j]);
        if (((blk + 1) * 32) % G == 0 || blk + 1 == nb) { /* the end of group g: its scales, its zeros */
            const int64_t gs = g < ng ? g : ng - 1;
            const __m512 sv = _mm512_loadu_ps(ks + gs * 16), zv = _mm512_loadu_ps(kz + gs * 16);
            for (int j = 0; j < mb; j++) {
                acc[j] = _mm512_fmadd_ps(part[j], sv, acc[j]);
                acc[j] = _mm512_fnmadd_ps(zv, _mm512_set1_ps(xs[(m0 + j) * ng + gs]), acc[j]);
                part[j] = _mm512_setzero_ps();
            }
            g++;
        }
    }
    const __mmask16 mk = tail_mask(nvalid);
    for (int j = 0; j < mb; j++) _mm512_mask_storeu_ps(y + (m0 + j) * ldy + n0, mk, acc[j]);
}

static void q4_mm(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t Kp, const float *ks,
                  const float *kz, int64_t ng, int64_t G, int64_t N, float *y, int64_t ldy, int nthreads) {
    const int64_t nb = Kp / 32, nblocks = (N + 15) / 16;
    int8_t *xq = aligned_alloc(64, (size_t)(M * Kp));
    float *d = malloc(sizeof(float) * (size_t)(M * nb));
    float *xs = calloc((size_t)(M * ng), sizeof(float));
    quantize_rows(x, M, K, Kp, xq, d);
    group_sums(xq, d, M, Kp, G, ng, xs);
    for (int64_t i = 0; i < M * nb; i++) d[i] /= 16.0f;  /* the codes enter as 16 * code */
    #define Q4_BLOCK(b) do { const uint8_t *wb = w + (b) * 8 * Kp; \
        const float *kb = ks + (b) * ng * 16, *zb = kz + (b) * ng * 16; \
        const int64_t n0 = (b) * 16, nv = N - n0; int64_t m0 = 0; \
        for (; m0 + 4 <= M; m0 += 4) q4_block(wb, kb, zb, ng, G, xq, d, xs, m0, 4, Kp, y, ldy, n0, nv); \
        for (; m0 + 2 <= M; m0 += 2) q4_block(wb, kb, zb, ng, G, xq, d, xs, m0, 2, Kp, y, ldy, n0, nv); \
        for (; m0 < M; m0++) q4_block(wb, kb, zb, ng, G, xq, d, xs, m0, 1, Kp, y, ldy, n0, nv); } while (0)
    FOR_ROWS(nblocks, Q4_BLOCK);
    free(xq); free(d); free(xs);
}

/* fp16 weights in blocks of 16 rows (cpu_kernels.pack_f16): each column's 16 values side by side
 * (32 bytes), converted exactly (vcvtph2ps) and multiplied in fp32 by x's value for that column
 * (broadcast): the 16 lanes end as the 16 rows' outputs. Columns are summed 16 at a time in two
 * chains (even and odd columns), so the FMA latency overlaps; the same order for every row count. */
static inline __attribute__((always_inline)) void f16_block(const uint16_t *wb, const float *x, int64_t K,
        int64_t m0, const int mb, float *y, int64_t ldy, int64_t n0, int64_t nvalid) {
    __m512 acc[4];
    for (int j = 0; j < mb; j++) acc[j] = _mm512_setzero_ps();
    for (int64_t c0 = 0; c0 < K; c0 += 16) {
        const int64_t cn = K - c0 < 16 ? K - c0 : 16;
        __m512 p0[4], p1[4];
        for (int j = 0; j < mb; j++) p0[j] = p1[j] = _mm512_setzero_ps();
        int64_t c = 0;
        for (; c + 2 <= cn; c += 2) {
            const __m512 w0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wb + (c0 + c) * 16)));
            const __m512 w1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wb + (c0 + c + 1) * 16)));
            for (int j = 0; j < mb; j++) {
                const float *xr = x + (m0 + j) * K + c0 + c;
                p0[j] = _mm512_fmadd_ps(w0, _mm512_set1_ps(xr[0]), p0[j]);
                p1[j] = _mm512_fmadd_ps(w1, _mm512_set1_ps(xr[1]), p1[j]);
            }
        }
        if (c < cn) {
            const __m512 w0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wb + (c0 + c) * 16)));
            for (int j = 0; j < mb; j++) p0[j] = _mm512_fmadd_ps(w0, _mm512_set1_ps(x[(m0 + j) * K + c0 + c]), p0[j]);
        }
        for (int j = 0; j < mb; j++) acc[j] = _mm512_add_ps(acc[j], _mm512_add_ps(p0[j], p1[j]));
    }
    const __mmask16 mk = tail_mask(nvalid);
    for (int j = 0; j < mb; j++) _mm512_mask_storeu_ps(y + (m0 + j) * ldy + n0, mk, acc[j]);
}

/* y (M, N) = x (M, K) W^T, W (N, K) fp16 (the .bin's f16 tensor, in pack_f16's blocks), all in fp32 */
static void f16_mm(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, float *y, int64_t ldy, int nthreads) {
    const int64_t nblocks = (N + 15) / 16;
    #define F16_BLOCK(b) do { const uint16_t *wb = w + (b) * 16 * K; const int64_t n0 = (b) * 16, nv = N - n0; \
        int64_t m0 = 0; \
        for (; m0 + 4 <= M; m0 += 4) f16_block(wb, x, K, m0, 4, y, ldy, n0, nv); \
        for (; m0 < M; m0++) f16_block(wb, x, K, m0, 1, y, ldy, n0, nv); } while (0)
    FOR_ROWS(nblocks, F16_BLOCK);
}

void fishai_q8_mm(const float *x, int64_t M, int64_t K, const int8_t *w, int64_t Kp, const float *s, int64_t N,
                  float *y, int nthreads) { q8_mm(x, M, K, w, Kp, s, N, y, N, nthreads); }

void fishai_q4_mm(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t Kp, const float *s,
                  const float *sz, int64_t ng, int64_t G, int64_t N, float *y, int nthreads) {
    q4_mm(x, M, K, w, Kp, s, sz, ng, G, N, y, N, nthreads);
}

void fishai_f16_mm(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, float *y, int nthreads) {
    f16_mm(x, M, K, w, N, y, N, nthreads);
}

/* Rows idx[0..n-1] of a blocked int8 table (pack_int8's layout) as fp32, code * scale[row]: the
 * embedding lookups of a .bin whose tied int8 table is also the head. -1 for an index outside
 * 0..N-1 (nothing written). */
int fishai_embed_q8(const int8_t *w, int64_t Kp, const float *s, int64_t K, int64_t N, const int64_t *idx, int64_t n,
                    float *out) {
    for (int64_t i = 0; i < n; i++)
        if (idx[i] < 0 || idx[i] >= N) return -1;
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = idx[i], lane = r % 16;
        const int8_t *wb = w + (r / 16) * 16 * Kp + lane * 4;
        for (int64_t c = 0; c < K; c++) out[i * K + c] = (float)wb[(c / 4) * 64 + c % 4] * s[r];
    }
    return 0;
}

/* The same for a blocked int4 table (pack_int4's layout): (code - zero) * scale per group of G
 * columns, the zero points (N, ng) bytes, the scales in block_scales' layout (N16 / 16, ng, 16). */
int fishai_embed_q4(const uint8_t *w, int64_t Kp, const float *ks, const uint8_t *z, int64_t ng, int64_t G, int64_t K,
                    int64_t N, const int64_t *idx, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++)
        if (idx[i] < 0 || idx[i] >= N) return -1;
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = idx[i], lane = r % 16;
        const uint8_t *wb = w + (r / 16) * 8 * Kp + lane * 4;
        const float *sb = ks + (r / 16) * ng * 16 + lane;
        for (int64_t c = 0; c < K; c++) {
            const uint8_t byte = wb[(c / 8) * 64 + c % 4];
            const int code = c % 8 < 4 ? byte & 15 : byte >> 4;
            const int64_t g = c / G;
            out[i * K + c] = ((float)code - (float)z[r * ng + g]) * sb[g * 16];
        }
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * The decode trunk: every transformer block of one decode step (T = 1) in one call, the math of
 * engine.Engine._forward (model.Block's) on a .bin whose every matmul runs on the kernels above:
 *   h = rmsnorm(x) * attn_norm; q, k, v = h Wqkv^T; q, k rotated (RoPE, halves); k, v into the
 *   cache at the row's position; y = softmax(q K^T / sqrt(hd)) V over the row's past (GQA);
 *   x += y Wo^T; h = rmsnorm(x) * mlp_norm; g, u = h Wgu^T; x += (silu(g) * u) Wdown^T
 * and the final rmsnorm. Each row of x is computed on its own, at its own position, against its
 * own cache row: the same bits whichever rows come with it. cpu_kernels.DecodeTrunk fills these
 * structs from the model's layers (field order and types must match it). */

typedef struct {
    int64_t kind;            /* 1 int8 (q8_mm), 2 int4 (q4_mm), 3 fp16 (f16_mm) */
    const void *w;           /* codes / packed codes / fp16 weight */
    const float *s, *sz;     /* int8: scales (N,); int4: scales and scaled zeros (N, ng) */
    int64_t N, K, Kp, ng, G;
} fishai_linear;

typedef struct {
    const float *attn_norm, *mlp_norm;
    float *k, *v;            /* the layer's cache, (rows, KV, length, hd) fp32 */
    int64_t n_qkv, n_gu;     /* 1 (fused) or 3 / 2 matmuls, outputs side by side */
    fishai_linear qkv[3], wo, gu[2], down;
} fishai_layer;

typedef struct {
    int64_t n_layers, d, H, KV, hd, d_ff, length;
    float eps;
    const float *cos, *sin;  /* (max_seq_len, hd / 2) */
    const float *final_norm;
    const fishai_layer *layers;
} fishai_trunk;

static void linear(const fishai_linear *L, const float *x, int64_t M, float *y, int64_t ldy, int nthreads) {
    if (L->kind == 1) q8_mm(x, M, L->K, (const int8_t *)L->w, L->Kp, L->s, L->N, y, ldy, nthreads);
    else if (L->kind == 2) q4_mm(x, M, L->K, (const uint8_t *)L->w, L->Kp, L->s, L->sz, L->ng, L->G, L->N, y, ldy, nthreads);
    else f16_mm(x, M, L->K, (const uint16_t *)L->w, L->N, y, ldy, nthreads);
}

static float dot(const float *a, const float *b, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    if (i < n) {
        const __mmask16 mk = tail_mask(n - i);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, a + i), _mm512_maskz_loadu_ps(mk, b + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* y = x / sqrt(mean(x^2) + eps) * w, as torch's rms_norm in fp32 */
static void rmsnorm(const float *x, const float *w, int64_t d, float eps, float *y) {
    const float r = 1.0f / sqrtf(dot(x, x, d) / (float)d + eps);
    for (int64_t i = 0; i < d; i++) y[i] = x[i] * r * w[i];
}

/* e^x in fp32, 16 at a time (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial,
 * scaled by 2^n; within 2 ulp of expf); x is clamped to [-87.3, 88.7] (e^-87.3 ~ 1e-38). */
static inline __m512 exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3365f)), _mm512_set1_ps(88.7228f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* y = silu(g) * u = g / (1 + e^-g) * u over n values */
static void swiglu(const float *g, const float *u, int64_t n, float *y) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 mk = tail_mask(n - i);
        const __m512 gv = _mm512_maskz_loadu_ps(mk, g + i);
        const __m512 s = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
        _mm512_mask_storeu_ps(y + i, mk, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(mk, u + i)));
    }
}

/* The sums of 4 vectors, [sum a0, sum a1, sum a2, sum a3], each in one fixed order */
static inline __attribute__((always_inline)) __m128 hsum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    const __m256 h0 = _mm256_add_ps(_mm512_castps512_ps256(a0), _mm512_extractf32x8_ps(a0, 1));
    const __m256 h1 = _mm256_add_ps(_mm512_castps512_ps256(a1), _mm512_extractf32x8_ps(a1, 1));
    const __m256 h2 = _mm256_add_ps(_mm512_castps512_ps256(a2), _mm512_extractf32x8_ps(a2, 1));
    const __m256 h3 = _mm256_add_ps(_mm512_castps512_ps256(a3), _mm512_extractf32x8_ps(a3, 1));
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(h0, h1), _mm256_hadd_ps(h2, h3));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

/* nh (1 or 2) query heads of one KV head against its positions 0..p: out = softmax(q k^T * scale) v
 * for each (q, scores and out of head j at q + j * hd, scores + j * stride, out + j * hd). The heads
 * share every K and V load (the cache is the step's largest read at long positions); scores of 4
 * positions at a time (one horizontal sum for 4), the softmax 16 at a time, v into 4 vectors at once.
 * hd a multiple of 16. Each head's numbers do not depend on the other. */
static inline __attribute__((always_inline)) void attend_heads(const float *q, const int nh, const float *kc,
        const float *vc, int64_t p, int64_t hd, float scale, float *scores, int64_t stride, float *out) {
    const int64_t n = p + 1;
    int64_t t = 0;
    for (; t + 4 <= n; t += 4) {
        __m512 a[2][4];
        for (int j = 0; j < nh; j++) for (int r = 0; r < 4; r++) a[j][r] = _mm512_setzero_ps();
        const float *k0 = kc + t * hd;
        for (int64_t c = 0; c < hd; c += 16) {
            __m512 kv[4];
            for (int r = 0; r < 4; r++) kv[r] = _mm512_loadu_ps(k0 + r * hd + c);
            for (int j = 0; j < nh; j++) {
                const __m512 qv = _mm512_loadu_ps(q + j * hd + c);
                for (int r = 0; r < 4; r++) a[j][r] = _mm512_fmadd_ps(qv, kv[r], a[j][r]);
            }
        }
        for (int j = 0; j < nh; j++)
            _mm_storeu_ps(scores + j * stride + t, _mm_mul_ps(hsum4(a[j][0], a[j][1], a[j][2], a[j][3]), _mm_set1_ps(scale)));
    }
    for (; t < n; t++)
        for (int j = 0; j < nh; j++) {
            __m512 a = _mm512_setzero_ps();
            for (int64_t c = 0; c < hd; c += 16)
                a = _mm512_fmadd_ps(_mm512_loadu_ps(q + j * hd + c), _mm512_loadu_ps(kc + t * hd + c), a);
            scores[j * stride + t] = _mm_cvtss_f32(hsum4(a, a, a, a)) * scale;
        }
    __m512 inv[2];
    for (int j = 0; j < nh; j++) {
        float *sc = scores + j * stride;
        __m512 mv = _mm512_set1_ps(-INFINITY);
        for (int64_t i = 0; i < n; i += 16) {
            const __mmask16 mk = tail_mask(n - i);
            mv = _mm512_mask_max_ps(mv, mk, mv, _mm512_maskz_loadu_ps(mk, sc + i));
        }
        const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
        __m512 sv = _mm512_setzero_ps();
        for (int64_t i = 0; i < n; i += 16) {
            const __mmask16 mk = tail_mask(n - i);
            const __m512 e = _mm512_maskz_mov_ps(mk, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, sc + i), mx)));
            _mm512_mask_storeu_ps(sc + i, mk, e);
            sv = _mm512_add_ps(sv, e);
        }
        inv[j] = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sv));
    }
    for (int64_t c0 = 0; c0 < hd; c0 += 64) {  /* 64 columns (or the last 16-48) a pass */
        const int nv = hd - c0 >= 64 ? 4 : (int)((hd - c0) / 16);
        __m512 o[2][4];
        for (int j = 0; j < nh; j++) for (int i = 0; i < 4; i++) o[j][i] = _mm512_setzero_ps();
        if (nv == 4) {
            for (int64_t s = 0; s < n; s++) {
                const float *v = vc + s * hd + c0;
                const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16), v2 = _mm512_loadu_ps(v + 32),
                             v3 = _mm512_loadu_ps(v + 48);
                for (int j = 0; j < nh; j++) {
                    const __m512 w = _mm512_set1_ps(scores[j * stride + s]);
                    o[j][0] = _mm512_fmadd_ps(w, v0, o[j][0]);
                    o[j][1] = _mm512_fmadd_ps(w, v1, o[j][1]);
                    o[j][2] = _mm512_fmadd_ps(w, v2, o[j][2]);
                    o[j][3] = _mm512_fmadd_ps(w, v3, o[j][3]);
                }
            }
        } else {
            for (int64_t s = 0; s < n; s++)
                for (int i = 0; i < nv; i++) {
                    const __m512 v = _mm512_loadu_ps(vc + s * hd + c0 + 16 * i);
                    for (int j = 0; j < nh; j++) o[j][i] = _mm512_fmadd_ps(_mm512_set1_ps(scores[j * stride + s]), v, o[j][i]);
                }
        }
        for (int j = 0; j < nh; j++)
            for (int i = 0; i < nv; i++) _mm512_storeu_ps(out + j * hd + c0 + 16 * i, _mm512_mul_ps(o[j][i], inv[j]));
    }
}

/* The same for any hd, one head (plain loops; no preset has an hd that is not a multiple of 16) */
static void attend_plain(const float *q, const float *kc, const float *vc, int64_t p, int64_t hd, float scale,
                         float *scores, float *out) {
    float mx = -INFINITY, sum = 0.0f;
    for (int64_t t = 0; t <= p; t++) {
        scores[t] = dot(q, kc + t * hd, hd) * scale;
        if (scores[t] > mx) mx = scores[t];
    }
    for (int64_t t = 0; t <= p; t++) sum += (scores[t] = expf(scores[t] - mx));
    memset(out, 0, sizeof(float) * (size_t)hd);
    for (int64_t t = 0; t <= p; t++) {
        const float a = scores[t] / sum;
        for (int64_t i = 0; i < hd; i++) out[i] += a * vc[t * hd + i];
    }
}

/* Query heads h0..h0+nh-1 (one KV head's, nh <= 2) of one row */
static void attend(const float *q, int nh, const float *kc, const float *vc, int64_t p, int64_t hd, float scale,
                   float *scores, int64_t stride, float *out) {
    if (hd % 16)
        for (int j = 0; j < nh; j++) attend_plain(q + j * hd, kc, vc, p, hd, scale, scores + j * stride, out + j * hd);
    else if (nh == 2)
        attend_heads(q, 2, kc, vc, p, hd, scale, scores, stride, out);
    else
        attend_heads(q, 1, kc, vc, p, hd, scale, scores, stride, out);
}

/* x (B, d) fp32: the embeddings in, the final normed hidden state out; row b of x is the token at
 * position pos[b] of cache row rows[b]. Rows of x may share a cache row (a prefill piece: one row's
 * consecutive positions): every row's keys and values of a layer are written before any attends,
 * and each attends positions 0..pos[b] only. Returns 0, or -1 when a position is outside the cache
 * (nothing written). */
int fishai_decode(const fishai_trunk *m, float *x, int64_t B, const int64_t *pos, const int64_t *rows, int nthreads) {
    const int64_t d = m->d, H = m->H, KV = m->KV, hd = m->hd, half = hd / 2, rep = H / KV, L = m->length;
    const int64_t wqkv = (H + 2 * KV) * hd, ff = m->d_ff;
    for (int64_t b = 0; b < B; b++)
        if (pos[b] < 0 || pos[b] >= L) return -1;
    float *h = malloc(sizeof(float) * (size_t)(B * d)), *qkv = malloc(sizeof(float) * (size_t)(B * wqkv));
    float *att = malloc(sizeof(float) * (size_t)(B * H * hd)), *gu = malloc(sizeof(float) * (size_t)(B * 2 * ff));
    float *act = malloc(sizeof(float) * (size_t)(B * ff)), *y = malloc(sizeof(float) * (size_t)(B * d));
    float *scores = malloc(sizeof(float) * (size_t)((nthreads > 1 ? nthreads : 1) * 2 * L));  /* a pair's, per thread */
    const float scale = 1.0f / sqrtf((float)hd);
    const int64_t ppg = (rep + 1) / 2, npairs = KV * ppg;  /* pairs of query heads per KV head, per row */
    for (int64_t l = 0; l < m->n_layers; l++) {
        const fishai_layer *ly = m->layers + l;
        for (int64_t b = 0; b < B; b++) rmsnorm(x + b * d, ly->attn_norm, d, m->eps, h + b * d);
        for (int64_t i = 0, off = 0; i < ly->n_qkv; off += ly->qkv[i].N, i++)
            linear(ly->qkv + i, h, B, qkv + off, wqkv, nthreads);
        for (int64_t b = 0; b < B; b++) {
            float *r = qkv + b * wqkv;
            const float *c = m->cos + pos[b] * half, *s = m->sin + pos[b] * half;
            for (int64_t hh = 0; hh < H + KV; hh++) {  /* q and k heads: the halves rotated */
                float *t = r + hh * hd;
                for (int64_t i = 0; i < half; i++) {
                    const float a = t[i], e = t[i + half];
                    t[i] = a * c[i] - e * s[i];
                    t[i + half] = e * c[i] + a * s[i];
                }
            }
            for (int64_t g = 0; g < KV; g++) {
                const int64_t at = ((rows[b] * KV + g) * L + pos[b]) * hd;
                memcpy(ly->k + at, r + (H + g) * hd, sizeof(float) * (size_t)hd);
                memcpy(ly->v + at, r + (H + KV + g) * hd, sizeof(float) * (size_t)hd);
            }
        }
        /* the query heads in pairs of one KV head (each pair reads its K and V once); rows inner, so
         * that the tokens of a prefill piece (one cache row) attend one after another over the same
         * keys and values, still in L2 from the token before */
        #define ATTEND(i) do { const int64_t b = (i) % B, g = ((i) / B) / ppg, j = ((i) / B) % ppg; \
            const int64_t hh = g * rep + 2 * j, base = (rows[b] * KV + g) * L * hd; \
            attend(qkv + b * wqkv + hh * hd, rep - 2 * j >= 2 ? 2 : 1, ly->k + base, ly->v + base, pos[b], hd, \
                   scale, scores + (nthreads > 1 ? omp_get_thread_num() : 0) * 2 * L, L, att + b * H * hd + hh * hd); \
            } while (0)
        FOR_ROWS(B * npairs, ATTEND);
        linear(&ly->wo, att, B, y, d, nthreads);
        for (int64_t i = 0; i < B * d; i++) x[i] += y[i];
        for (int64_t b = 0; b < B; b++) rmsnorm(x + b * d, ly->mlp_norm, d, m->eps, h + b * d);
        for (int64_t i = 0, off = 0; i < ly->n_gu; off += ly->gu[i].N, i++)
            linear(ly->gu + i, h, B, gu + off, 2 * ff, nthreads);
        for (int64_t b = 0; b < B; b++) swiglu(gu + b * 2 * ff, gu + b * 2 * ff + ff, ff, act + b * ff);
        linear(&ly->down, act, B, y, d, nthreads);
        for (int64_t i = 0; i < B * d; i++) x[i] += y[i];
    }
    for (int64_t b = 0; b < B; b++) {
        rmsnorm(x + b * d, m->final_norm, d, m->eps, h + b * d);
        memcpy(x + b * d, h + b * d, sizeof(float) * (size_t)d);
    }
    free(h); free(qkv); free(att); free(gu); free(act); free(y); free(scores);
    return 0;
}

#endif
