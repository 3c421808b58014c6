/* Homomorphic decode attention on the paged 2/4/8-bit cache, for CPUs: the two paged products of
 * cpu_ops.hack_scores / hack_pv (the math of reference.hack_scores / hack_pv, channel key axis), reading the
 * packed code bytes and the fp16 group parameters in place from the pool, page by page.
 *
 * Built by common/kv/native.py (cc -O3 -march=native -shared); no Python or torch headers. One call covers the
 * (sequence, KV head) pairs [bh_start, bh_end) of a batch, so Python runs disjoint ranges on several threads.
 *
 * Token scales (token_exp, kv_exp of format.py, or NULL): each token's score times its K 2^e, each probability
 * times its V 2^e before P is quantized (Geometry.exp_shift picks the nibble).
 *
 * Layouts (format.py): codes [blocks, H, bs, W] uint8, a token's row holds channel c in byte c / per_byte at bit
 * bits * (c % per_byte) (per_byte = 8 / bits; Geometry.bits is the width of the codes a call reads: K's in
 * hack_paged_scores, V's in hack_paged_pv, which differ under key_bits); group parameters [blocks, H, bs / PI, D]
 * fp16 (one row per group of PI tokens). The code sums of the pool are not read: summing the codes here costs
 * one add per code, read anyway. All products of codes are integers below 2^24, so float32 accumulates them exactly. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define HAVE_VNNI 1
#endif

typedef _Float16 half;

typedef struct {
    int64_t heads, head_dim, bits, partition, head_part, block_size, rows, max_pages;
    int64_t exp_shift;  /* token scales: the bit of this call's exponent nibble in kv_exp (0: K, 4: V) */
} Geometry;

/* 2^e of a token-exponent nibble (format.py token scales: e = n for n < 8, n - 16 above) */
static const float EXP_FACTOR[16] = {1.0f, 2.0f, 4.0f, 8.0f, 16.0f, 32.0f, 64.0f, 128.0f,
                                     1.0f / 256, 1.0f / 128, 1.0f / 64, 1.0f / 32, 1.0f / 16, 1.0f / 8, 1.0f / 4, 0.5f};

static inline float token_factor(const Geometry *g, const uint8_t *token_exp, int64_t row) {
    /* the token's 2^e for this call's part, 1 without token scales (token_exp NULL) */
    return token_exp ? EXP_FACTOR[(token_exp[row] >> g->exp_shift) & 15] : 1.0f;
}

static inline int64_t token_row(const Geometry *g, const int32_t *table, int64_t head, int64_t t) {
    /* the pool row (block, head, slot) of paged token t */
    int64_t page = table[t / g->block_size];
    return (page * g->heads + head) * g->block_size + t % g->block_size;
}

static inline int64_t group_row(const Geometry *g, const int32_t *table, int64_t head, int64_t t) {
    /* the pool row (block, head, group) of the parameters of the group holding paged token t */
    int64_t page = table[t / g->block_size];
    return (page * g->heads + head) * (g->block_size / g->partition) + (t % g->block_size) / g->partition;
}

/* Codes of a packed row in plane order: position s * width + j holds channel j * per_byte + s (the code at bit
 * bits * s of byte j), so that each plane is a contiguous run the compiler vectorizes. Inlined with a constant
 * `bits` (the PLANES variants below), as float (P·V) or int16 (q·k: integer dot products, which vectorize with
 * exact tree reductions where a float reduction would be summed in order). */
#define PLANES(name, type, bits)                                                                              \
    static void name(const uint8_t *src, type *dst, int64_t width) {                                           \
        for (int s = 0; s < 8 / (bits); s++)                                                                   \
            for (int64_t j = 0; j < width; j++) dst[s * width + j] = (type)((src[j] >> ((bits) * s)) & ((1 << (bits)) - 1)); \
    }
PLANES(planes2f, float, 2)
PLANES(planes4f, float, 4)
PLANES(planes8f, float, 8)
PLANES(planes2i, int16_t, 2)
PLANES(planes4i, int16_t, 4)
PLANES(planes8i, int16_t, 8)

static inline void unpack(const uint8_t *src, float *dst, int64_t width, int64_t bits) {
    bits == 2 ? planes2f(src, dst, width) : bits == 4 ? planes4f(src, dst, width) : planes8f(src, dst, width);
}

static inline void unpack_int(const uint8_t *src, int16_t *dst, int64_t width, int64_t bits) {
    bits == 2 ? planes2i(src, dst, width) : bits == 4 ? planes4i(src, dst, width) : planes8i(src, dst, width);
}

static inline int64_t plane_channel(int64_t position, int64_t width, int64_t per_byte) {
    /* the channel at plane-order position `position` */
    return position % width * per_byte + position / width;
}

/* 8-bit asymmetric quantization of x[n] (format.quantize with 8 bits, fp32 parameters, nearest rounding):
 * codes into out, returns the scale, *lo the minimum. */
static inline float quantize_u8(const float *x, int64_t n, float *out, float *lo) {
    float mn = x[0], mx = x[0];
    for (int64_t i = 1; i < n; i++) {
        mn = x[i] < mn ? x[i] : mn;
        mx = x[i] > mx ? x[i] : mx;
    }
    float scale = (mx - mn) / 255.0f, safe = scale > 0 ? scale : 1.0f;
    for (int64_t i = 0; i < n; i++) {
        float c = nearbyintf((x[i] - mn) / safe);
        out[i] = c < 0 ? 0 : c > 255 ? 255 : c;
    }
    *lo = mn;
    return scale;
}

/* min/max 8-bit quantization (quantize_u8) of the plane-order positions of head_dim partition p: bytes
 * [p * run, (p + 1) * run) of every plane. */
static float quantize_partition(const float *x, int64_t width, int64_t per_byte, int64_t p, int64_t run,
                                int16_t *out, float *lo) {
    float mn = x[p * run], mx = mn;
    for (int64_t s = 0; s < per_byte; s++)
        for (int64_t j = p * run; j < (p + 1) * run; j++) {
            const float v = x[s * width + j];
            mn = v < mn ? v : mn;
            mx = v > mx ? v : mx;
        }
    const float scale = (mx - mn) / 255.0f, safe = scale > 0 ? scale : 1.0f;
    for (int64_t s = 0; s < per_byte; s++)
        for (int64_t j = p * run; j < (p + 1) * run; j++) {
            const float c = nearbyintf((x[s * width + j] - mn) / safe);
            out[s * width + j] = (int16_t)(c < 0 ? 0 : c > 255 ? 255 : c);
        }
    *lo = mn;
    return scale;
}

/* Scores q·k of the paged tokens: q [BH, R, D] (scaled queries), scores row (bh, r) at
 * scores + (bh * R + r) * stride, token t at column t < n_paged[b]. Per group: q folded with K's per-channel
 * scales, quantized to 8 bits per head_part channels, the integer product with K's codes, then
 * scale x product + minimum x code sums + q·mK. Channels are handled in plane order (unpack_planes). */
static void scores_generic(const Geometry *g, const uint8_t *k_codes, const half *k_scale, const half *k_min,
                        const uint8_t *token_exp, const int32_t *block_tables, const int64_t *n_paged,
                        const float *q, float *scores, int64_t stride, int64_t bh_start, int64_t bh_end) {
    const int64_t D = g->head_dim, R = g->rows, P = D / g->head_part, W = D * g->bits / 8;
    const int64_t per_byte = 8 / g->bits, run = g->head_part / per_byte;
    float *qp = malloc(sizeof(float) * R * D), *folded = malloc(sizeof(float) * R * D);
    int16_t *qcodes = malloc(sizeof(int16_t) * R * D), *krow = malloc(sizeof(int16_t) * D);
    float *qscale = malloc(sizeof(float) * R * P), *qmin = malloc(sizeof(float) * R * P);
    float *offset = malloc(sizeof(float) * R), *ksum = malloc(sizeof(float) * P);
    float *sK = malloc(sizeof(float) * D), *mK = malloc(sizeof(float) * D);
    int64_t *channel = malloc(sizeof(int64_t) * D);
    for (int64_t i = 0; i < D; i++) channel[i] = plane_channel(i, W, per_byte);
    for (int64_t bh = bh_start; bh < bh_end; bh++) {
        const int64_t b = bh / g->heads, h = bh % g->heads, n = n_paged[b];
        const int32_t *table = block_tables + b * g->max_pages;
        for (int64_t r = 0; r < R; r++)
            for (int64_t i = 0; i < D; i++) qp[r * D + i] = q[(bh * R + r) * D + channel[i]];
        for (int64_t t0 = 0; t0 < n; t0 += g->partition) {
            const int64_t prow = group_row(g, table, h, t0) * D;
            for (int64_t i = 0; i < D; i++) {
                sK[i] = (float)k_scale[prow + channel[i]];
                mK[i] = (float)k_min[prow + channel[i]];
            }
            for (int64_t r = 0; r < R; r++) {
                float off = 0;
                for (int64_t i = 0; i < D; i++) {
                    folded[r * D + i] = qp[r * D + i] * sK[i];
                    off += qp[r * D + i] * mK[i];
                }
                offset[r] = off;
                for (int64_t p = 0; p < P; p++)
                    qscale[r * P + p] = quantize_partition(folded + r * D, W, per_byte, p, run, qcodes + r * D,
                                                           qmin + r * P + p);
            }
            const int64_t t1 = t0 + g->partition < n ? t0 + g->partition : n;
            for (int64_t t = t0; t < t1; t++) {
                const float factor = token_factor(g, token_exp, token_row(g, table, h, t));
                unpack_int(k_codes + token_row(g, table, h, t) * W, krow, W, g->bits);
                for (int64_t p = 0; p < P; p++) {
                    int32_t sum = 0;
                    for (int64_t s = 0; s < per_byte; s++)
                        for (int64_t j = p * run; j < (p + 1) * run; j++) sum += krow[s * W + j];
                    ksum[p] = (float)sum;
                }
                for (int64_t r = 0; r < R; r++) {
                    float total = offset[r];
                    for (int64_t p = 0; p < P; p++) {
                        const int16_t *a = qcodes + r * D;
                        int32_t dot = 0;
                        for (int64_t s = 0; s < per_byte; s++)
                            for (int64_t j = p * run; j < (p + 1) * run; j++) dot += a[s * W + j] * krow[s * W + j];
                        total += qscale[r * P + p] * (float)dot + qmin[r * P + p] * ksum[p];
                    }
                    scores[(bh * R + r) * stride + t] = total * factor;
                }
            }
        }
    }
    free(qp), free(folded), free(qcodes), free(qscale), free(qmin), free(offset), free(krow), free(ksum);
    free(sK), free(mK), free(channel);
}

/* P·V of the paged tokens: probabilities row (bh, r) at probs + (bh * R + r) * stride (column t < n_paged[b]),
 * out [BH, R, D] (overwritten). Per group of PI tokens (past n_paged: zero probabilities): P quantized to
 * 8 bits per row, the integer product with V's codes, then sP sV x product + minimum x sV x code sums
 * + (Σ dequantized P) x mV. Channels in plane order until the output is written. */
static void pv_generic(const Geometry *g, const uint8_t *v_codes, const half *v_scale, const half *v_min,
                    const uint8_t *token_exp, const int32_t *block_tables, const int64_t *n_paged,
                    const float *probs, int64_t stride, float *out, int64_t bh_start, int64_t bh_end) {
    const int64_t D = g->head_dim, R = g->rows, PI = g->partition, W = D * g->bits / 8, per_byte = 8 / g->bits;
    float *p = malloc(sizeof(float) * R * PI), *pcodes = malloc(sizeof(float) * R * PI);
    float *product = malloc(sizeof(float) * R * D), *acc = malloc(sizeof(float) * R * D);
    float *vrow = malloc(sizeof(float) * D), *vsum = malloc(sizeof(float) * D);
    float *pscale = malloc(sizeof(float) * R), *pmin = malloc(sizeof(float) * R), *psum = malloc(sizeof(float) * R);
    float *factor = malloc(sizeof(float) * PI);
    int64_t *channel = malloc(sizeof(int64_t) * D);
    for (int64_t i = 0; i < D; i++) channel[i] = plane_channel(i, W, per_byte);
    for (int64_t bh = bh_start; bh < bh_end; bh++) {
        const int64_t b = bh / g->heads, h = bh % g->heads, n = n_paged[b];
        const int32_t *table = block_tables + b * g->max_pages;
        memset(acc, 0, sizeof(float) * R * D);
        for (int64_t t0 = 0; t0 < n; t0 += PI) {
            const int64_t count = t0 + PI < n ? PI : n - t0;
            for (int64_t i = 0; i < count; i++) factor[i] = token_factor(g, token_exp, token_row(g, table, h, t0 + i));
            for (int64_t r = 0; r < R; r++) {
                const float *src = probs + (bh * R + r) * stride + t0;
                for (int64_t i = 0; i < PI; i++) p[r * PI + i] = i < count ? src[i] * factor[i] : 0.0f;
                pscale[r] = quantize_u8(p + r * PI, PI, pcodes + r * PI, pmin + r);
                float codes_sum = 0;
#pragma omp simd reduction(+ : codes_sum)
                for (int64_t i = 0; i < PI; i++) codes_sum += pcodes[r * PI + i];
                psum[r] = PI * pmin[r] + pscale[r] * codes_sum;
            }
            memset(product, 0, sizeof(float) * R * D);
            memset(vsum, 0, sizeof(float) * D);
            for (int64_t i = 0; i < count; i++) {
                unpack(v_codes + token_row(g, table, h, t0 + i) * W, vrow, W, g->bits);
                for (int64_t c = 0; c < D; c++) vsum[c] += vrow[c];
                for (int64_t r = 0; r < R; r++) {
                    const float a = pcodes[r * PI + i];
                    float *dst = product + r * D;
                    for (int64_t c = 0; c < D; c++) dst[c] += a * vrow[c];
                }
            }
            const int64_t prow = group_row(g, table, h, t0) * D;
            for (int64_t r = 0; r < R; r++)
                for (int64_t c = 0; c < D; c++) {
                    const float sv = (float)v_scale[prow + channel[c]];
                    acc[r * D + c] += pscale[r] * sv * product[r * D + c] + pmin[r] * sv * vsum[c] +
                                      psum[r] * (float)v_min[prow + channel[c]];
                }
        }
        for (int64_t r = 0; r < R; r++)
            for (int64_t c = 0; c < D; c++) out[(bh * R + r) * D + channel[c]] = acc[r * D + c];
    }
    free(p), free(pcodes), free(product), free(acc), free(vrow), free(vsum), free(pscale), free(pmin), free(psum);
    free(factor), free(channel);
}

#ifdef HAVE_VNNI
/* AVX512-VNNI variants for 2-bit codes (the default): vpdpbusd multiplies 4 unsigned codes by 4 signed 8-bit
 * values and adds them into a 32-bit lane. A 2-bit code byte masked with 0x03030303 after a shift of 2s holds,
 * per byte, the code of one channel: the 8-bit operand is the other factor's codes minus 128 (signed), and
 * 128 x (code sums) restores the unsigned product. Exact integer arithmetic, as in the generic code. */

static inline void halves_to_float(const half *src, float *dst, int64_t n) {  /* n: a multiple of 16 */
    for (int64_t i = 0; i < n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
}

/* token_factor of 16 consecutive exponent bytes: the nibble picked by a shift and a mask, 2^e by vpermps */
static inline __m512 token_factors16(const Geometry *g, const uint8_t *bytes) {
    const __m512i wide = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)bytes));
    const __m512i nibbles = _mm512_and_si512(_mm512_srli_epi32(wide, (unsigned)g->exp_shift), _mm512_set1_epi32(15));
    return _mm512_permutexvar_ps(nibbles, _mm512_loadu_ps(EXP_FACTOR));
}

/* x[i] times factor[i] (token scales), or x[i] where factor is NULL, for 16 lanes from i */
static inline __m512 load_scaled(const float *x, const float *factor, int64_t i) {
    const __m512 v = _mm512_loadu_ps(x + i);
    return factor ? _mm512_mul_ps(v, _mm512_loadu_ps(factor + i)) : v;
}

/* quantize_u8 of x[n] (times factor[n] when not NULL; n a multiple of 16) with the codes minus 128 as signed
 * bytes into out (channel order); returns the scale, *lo the minimum. _mm512_roundscale_ps rounds half to even,
 * as nearbyintf and torch.round. */
static inline float quantize_s8_avx(const float *x, const float *factor, int64_t n, int8_t *out, float *lo,
                                    float *codes_sum) {
    __m512 mn = load_scaled(x, factor, 0), mx = mn;
    for (int64_t i = 16; i < n; i += 16) {
        mn = _mm512_min_ps(mn, load_scaled(x, factor, i));
        mx = _mm512_max_ps(mx, load_scaled(x, factor, i));
    }
    const float low = _mm512_reduce_min_ps(mn), scale = (_mm512_reduce_max_ps(mx) - low) / 255.0f;
    const __m512 base = _mm512_set1_ps(low), safe = _mm512_set1_ps(scale > 0 ? scale : 1.0f);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        __m512 c = _mm512_div_ps(_mm512_sub_ps(load_scaled(x, factor, i), base), safe);
        c = _mm512_roundscale_ps(c, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        c = _mm512_min_ps(_mm512_max_ps(c, _mm512_setzero_ps()), _mm512_set1_ps(255.0f));
        sum = _mm512_add_ps(sum, c);
        const __m128i bytes = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(c));  /* 0..255 */
        _mm_storeu_si128((__m128i *)(out + i), _mm_xor_si128(bytes, _mm_set1_epi8((char)0x80)));
    }
    *lo = low;
    if (codes_sum) *codes_sum = _mm512_reduce_add_ps(sum);  /* exact: integers below 2^24 */
    return scale;
}

/* q·k: 16 tokens per vector (a gather of one 32-bit word of each token's row), channels reduced in the lanes.
 * 2- or 4-bit K codes: a word holds per_byte = 8 / bits codes of each of its 4 bytes; vector v = word * per_byte + s
 * holds the codes at shift s, i.e. 4 channels (one per byte) of 16 tokens, and q's codes are packed to match:
 * dword v of a row = the 4 q codes of those channels (by_shift puts a 16-channel chunk in that order). */
static void scores_vnni(const Geometry *g, const uint8_t *k_codes, const half *k_scale, const half *k_min,
                        const uint8_t *token_exp, const int32_t *block_tables, const int64_t *n_paged,
                        const float *q, float *scores, int64_t stride, int64_t bh_start, int64_t bh_end) {
    const int64_t D = g->head_dim, R = g->rows, pd = g->head_part, P = D / pd, bits = g->bits;
    const int64_t W = D * bits / 8, words = W / 4, per_byte = 8 / bits, vectors = D / 4;
    float *folded = malloc(sizeof(float) * D), *sK = malloc(sizeof(float) * D), *mK = malloc(sizeof(float) * D);
    float *qscale = malloc(sizeof(float) * R * P), *qmin = malloc(sizeof(float) * R * P);
    float *offset = malloc(sizeof(float) * R);
    int8_t *codes = malloc(D);
    int32_t *packed = malloc(sizeof(int32_t) * R * vectors);  /* [R][vector]: 4 signed q codes */
    __m512i *cv = aligned_alloc(64, sizeof(__m512i) * vectors);  /* a 16-token block's codes per vector */
    __m512i *sums = aligned_alloc(64, sizeof(__m512i) * P);  /* its code sums per q partition */
    const __m512i lanes = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32((int)W));
    const __m512i low = _mm512_set1_epi32(bits == 2 ? 0x03030303 : 0x0F0F0F0F), ones = _mm512_set1_epi32(0x01010101);
    /* 16 channel codes c0..c15 -> 4 dwords. 2 bits (one word): dword s = [c_s, c_4+s, c_8+s, c_12+s];
     * 4 bits (two words w): dword 2w + s = [c_8w+s, c_8w+2+s, c_8w+4+s, c_8w+6+s] */
    const __m128i by_shift = bits == 2 ? _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15)
                                       : _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
    for (int64_t bh = bh_start; bh < bh_end; bh++) {
        const int64_t b = bh / g->heads, h = bh % g->heads, n = n_paged[b];
        const int32_t *table = block_tables + b * g->max_pages;
        for (int64_t t0 = 0; t0 < n; t0 += g->partition) {
            const int64_t prow = group_row(g, table, h, t0) * D, count = n - t0 < g->partition ? n - t0 : g->partition;
            halves_to_float(k_scale + prow, sK, D);
            halves_to_float(k_min + prow, mK, D);
            for (int64_t r = 0; r < R; r++) {
                const float *qr = q + (bh * R + r) * D;
                __m512 off = _mm512_setzero_ps();
                for (int64_t c = 0; c < D; c += 16) {
                    const __m512 qv = _mm512_loadu_ps(qr + c);
                    off = _mm512_fmadd_ps(qv, _mm512_loadu_ps(mK + c), off);
                    _mm512_storeu_ps(folded + c, _mm512_mul_ps(qv, _mm512_loadu_ps(sK + c)));
                }
                offset[r] = _mm512_reduce_add_ps(off);
                for (int64_t p = 0; p < P; p++)
                    qscale[r * P + p] = quantize_s8_avx(folded + p * pd, NULL, pd, codes + p * pd, qmin + r * P + p,
                                                        NULL);
                for (int64_t chunk = 0; chunk < D / 16; chunk++)
                    _mm_storeu_si128((__m128i *)(packed + r * vectors + 4 * chunk),
                                     _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(codes + 16 * chunk)),
                                                      by_shift));
            }
            const uint8_t *rows = k_codes + token_row(g, table, h, t0) * W;  /* a group lies in one page */
            for (int64_t tb = 0; tb < count; tb += 16) {
                const __mmask16 mask = count - tb >= 16 ? 0xFFFF : (__mmask16)((1u << (count - tb)) - 1);
                __m512 factors = _mm512_set1_ps(1.0f);  /* the 16 tokens' 2^e (token scales) */
                if (token_exp)  /* 16 exponent bytes: in the group's page even past its stored tokens */
                    factors = token_factors16(g, token_exp + token_row(g, table, h, t0) + tb);
                for (int64_t p = 0; p < P; p++) sums[p] = _mm512_setzero_si512();
                for (int64_t word = 0; word < words; word++) {  /* the 16 tokens' codes, once for all rows */
                    const __m512i data = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, lanes,
                                                                     rows + tb * W + 4 * word, 1);
                    for (int64_t s = 0; s < per_byte; s++) {
                        const int64_t v = word * per_byte + s, p = 4 * v / pd;
                        cv[v] = _mm512_and_si512(_mm512_srli_epi32(data, (unsigned)(bits * s)), low);
                        sums[p] = _mm512_dpbusd_epi32(sums[p], cv[v], ones);
                    }
                }
                for (int64_t r = 0; r < R; r++) {
                    const int32_t *qr = packed + r * vectors;
                    __m512 total = _mm512_set1_ps(offset[r]);
                    for (int64_t p = 0; p < P; p++) {
                        __m512i a0 = _mm512_slli_epi32(sums[p], 7), a1 = _mm512_setzero_si512();
                        __m512i a2 = _mm512_setzero_si512(), a3 = _mm512_setzero_si512();
                        for (int64_t v = p * pd / 4; v < (p + 1) * pd / 4; v += 4) {  /* 4 channels a vector */
                            const __m512i *c = cv + v;
                            const int32_t *w = qr + v;
                            a0 = _mm512_dpbusd_epi32(a0, c[0], _mm512_set1_epi32(w[0]));
                            a1 = _mm512_dpbusd_epi32(a1, c[1], _mm512_set1_epi32(w[1]));
                            a2 = _mm512_dpbusd_epi32(a2, c[2], _mm512_set1_epi32(w[2]));
                            a3 = _mm512_dpbusd_epi32(a3, c[3], _mm512_set1_epi32(w[3]));
                        }
                        const __m512i dot = _mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3));
                        total = _mm512_fmadd_ps(_mm512_set1_ps(qscale[r * P + p]), _mm512_cvtepi32_ps(dot), total);
                        total = _mm512_fmadd_ps(_mm512_set1_ps(qmin[r * P + p]), _mm512_cvtepi32_ps(sums[p]), total);
                    }
                    _mm512_mask_storeu_ps(scores + (bh * R + r) * stride + t0 + tb, mask,
                                          _mm512_mul_ps(total, factors));
                }
            }
        }
    }
    free(folded), free(sK), free(mK), free(qscale), free(qmin), free(offset), free(codes), free(packed), free(cv), free(sums);
}

/* P·V: 4 tokens per 32-bit lane (the rows of 4 tokens interleaved byte by byte), 16 byte positions of the rows
 * per vector; a lane's code (chunk k, lane l, shift s) is channel 4 (16 k + l) + s. */
static void pv_vnni(const Geometry *g, const uint8_t *v_codes, const half *v_scale, const half *v_min,
                    const uint8_t *token_exp, const int32_t *block_tables, const int64_t *n_paged,
                    const float *probs, int64_t stride, float *out, int64_t bh_start, int64_t bh_end) {
    const int64_t D = g->head_dim, R = g->rows, PI = g->partition, W = D / 4, chunks = W / 16;
    const int64_t vectors = chunks * 4;  /* (chunk, shift) accumulators per row */
    float *p = malloc(sizeof(float) * PI), *natural = malloc(sizeof(float) * D);
    float *factor = malloc(sizeof(float) * PI);
    float *pscale = malloc(sizeof(float) * R), *pmin = malloc(sizeof(float) * R), *psum = malloc(sizeof(float) * R);
    int8_t *signed_codes = malloc((size_t)R * (PI + 4));
    __m512i *cv = aligned_alloc(64, sizeof(__m512i) * (PI / 4 + 1) * vectors);  /* a group's codes per (step, v) */
    __m512i *sums = aligned_alloc(64, sizeof(__m512i) * vectors);  /* its code sums per (chunk, shift) lane */
    float *result = malloc(sizeof(float) * R * D), *sv = malloc(sizeof(float) * D), *mv = malloc(sizeof(float) * D);
    int64_t *channel = malloc(sizeof(int64_t) * D);  /* lane order -> channel */
    for (int64_t k = 0; k < chunks; k++)
        for (int s = 0; s < 4; s++)
            for (int l = 0; l < 16; l++) channel[(k * 4 + s) * 16 + l] = 4 * (16 * k + l) + s;
    const __m512i low2 = _mm512_set1_epi32(0x03030303), ones = _mm512_set1_epi32(0x01010101);
    const __m128i zero = _mm_setzero_si128();
    for (int64_t bh = bh_start; bh < bh_end; bh++) {
        const int64_t b = bh / g->heads, h = bh % g->heads, n = n_paged[b];
        const int32_t *table = block_tables + b * g->max_pages;
        memset(result, 0, sizeof(float) * R * D);
        for (int64_t t0 = 0; t0 < n; t0 += PI) {
            const int64_t count = n - t0 < PI ? n - t0 : PI;
            const float *scale_by = NULL;  /* token scales: the group's 2^e, applied as P is quantized */
            if (token_exp) {  /* PI exponent bytes: the group lies in one page */
                const uint8_t *group_exp = token_exp + token_row(g, table, h, t0);
                for (int64_t i = 0; i < PI; i += 16) _mm512_storeu_ps(factor + i, token_factors16(g, group_exp + i));
                scale_by = factor;
            }
            for (int64_t r = 0; r < R; r++) {
                const float *src = probs + (bh * R + r) * stride + t0;
                const float *x = src;
                if (count < PI) {  /* the last group: zero probabilities past the stored tokens */
                    for (int64_t i = 0; i < PI; i++) p[i] = i < count ? src[i] : 0.0f;
                    x = p;
                }
                float codes_sum;
                pscale[r] = quantize_s8_avx(x, scale_by, PI, signed_codes + r * (PI + 4), pmin + r, &codes_sum);
                psum[r] = PI * pmin[r] + pscale[r] * codes_sum;
            }
            const uint8_t *rows = v_codes + token_row(g, table, h, t0) * W;
            const int64_t steps = (count + 3) / 4;
            for (int64_t v = 0; v < vectors; v++) sums[v] = _mm512_setzero_si512();
            for (int64_t step = 0; step < steps; step++) {  /* the group's codes, once for all rows */
                const int64_t t = 4 * step;
                for (int64_t k = 0; k < chunks; k++) {
                    __m128i x[4];
                    for (int j = 0; j < 4; j++)  /* tokens past the group's end read as zero codes */
                        x[j] = t + j < count ? _mm_loadu_si128((const __m128i *)(rows + (t + j) * W + 16 * k)) : zero;
                    const __m128i ab_lo = _mm_unpacklo_epi8(x[0], x[1]), ab_hi = _mm_unpackhi_epi8(x[0], x[1]);
                    const __m128i cd_lo = _mm_unpacklo_epi8(x[2], x[3]), cd_hi = _mm_unpackhi_epi8(x[2], x[3]);
                    __m512i data = _mm512_castsi128_si512(_mm_unpacklo_epi16(ab_lo, cd_lo));
                    data = _mm512_inserti32x4(data, _mm_unpackhi_epi16(ab_lo, cd_lo), 1);
                    data = _mm512_inserti32x4(data, _mm_unpacklo_epi16(ab_hi, cd_hi), 2);
                    data = _mm512_inserti32x4(data, _mm_unpackhi_epi16(ab_hi, cd_hi), 3);
                    for (int s = 0; s < 4; s++) {
                        const int64_t v = k * 4 + s;
                        cv[step * vectors + v] = _mm512_and_si512(_mm512_srli_epi32(data, 2 * s), low2);
                        sums[v] = _mm512_dpbusd_epi32(sums[v], cv[step * vectors + v], ones);
                    }
                }
            }
            const int64_t prow = group_row(g, table, h, t0) * D;
            halves_to_float(v_scale + prow, natural, D);
            for (int64_t i = 0; i < D; i++) sv[i] = natural[channel[i]];
            halves_to_float(v_min + prow, natural, D);
            for (int64_t i = 0; i < D; i++) mv[i] = natural[channel[i]];
            for (int64_t r = 0; r < R; r++) {
                const int32_t *four = (const int32_t *)(signed_codes + r * (PI + 4));  /* 4 tokens' P codes */
                const __m512 ps = _mm512_set1_ps(pscale[r]), pm = _mm512_set1_ps(pmin[r]);
                const __m512 pt = _mm512_set1_ps(psum[r]);
                for (int64_t v = 0; v < vectors; v += 4) {  /* 4 independent accumulation chains */
                    __m512i a[4];
                    for (int i = 0; i < 4; i++) a[i] = _mm512_slli_epi32(sums[v + i], 7);
                    for (int64_t step = 0; step < steps; step++) {
                        const __m512i codes = _mm512_set1_epi32(four[step]);
                        const __m512i *c = cv + step * vectors + v;
                        for (int i = 0; i < 4; i++) a[i] = _mm512_dpbusd_epi32(a[i], c[i], codes);
                    }
                    for (int i = 0; i < 4; i++) {
                        const int64_t lane0 = 16 * (v + i);
                        const __m512 scale = _mm512_loadu_ps(sv + lane0), minimum = _mm512_loadu_ps(mv + lane0);
                        __m512 o = _mm512_loadu_ps(result + r * D + lane0);
                        o = _mm512_fmadd_ps(_mm512_mul_ps(ps, scale), _mm512_cvtepi32_ps(a[i]), o);
                        o = _mm512_fmadd_ps(_mm512_mul_ps(pm, scale), _mm512_cvtepi32_ps(sums[v + i]), o);
                        o = _mm512_fmadd_ps(pt, minimum, o);
                        _mm512_storeu_ps(result + r * D + lane0, o);
                    }
                }
            }
        }
        for (int64_t r = 0; r < R; r++)
            for (int64_t i = 0; i < D; i++) out[(bh * R + r) * D + channel[i]] = result[r * D + i];
    }
    free(p), free(natural), free(factor), free(pscale), free(pmin), free(psum), free(signed_codes), free(cv), free(sums);
    free(result);
    free(sv), free(mv), free(channel);
}
#endif

static int vnni_fits(const Geometry *g, int64_t max_bits) {
    /* 2-bit codes (4-bit too for q·k), whole 16-byte chunks per row, whole 16-channel chunks per q partition */
#ifdef HAVE_VNNI
    return (g->bits == 2 || g->bits == max_bits) && g->head_dim % 64 == 0 && g->head_part % 16 == 0;
#else
    (void)g, (void)max_bits;
    return 0;
#endif
}
#define SCORES_VNNI_BITS 4
#define PV_VNNI_BITS 2

/* Whether q·k (1) and P·V (2) take the AVX512-VNNI paths for this geometry (its bits: K's, or V's). */
int hack_paged_vnni(const Geometry *g) {
    return vnni_fits(g, SCORES_VNNI_BITS) | vnni_fits(g, PV_VNNI_BITS) << 1;
}

void hack_paged_scores(const Geometry *g, const uint8_t *k_codes, const half *k_scale, const half *k_min,
                        const uint8_t *token_exp, const int32_t *block_tables, const int64_t *n_paged,
                        const float *q, float *scores, int64_t stride, int64_t bh_start, int64_t bh_end) {
#ifdef HAVE_VNNI
    if (vnni_fits(g, SCORES_VNNI_BITS)) {
        scores_vnni(g, k_codes, k_scale, k_min, token_exp, block_tables, n_paged, q, scores, stride, bh_start,
                    bh_end);
        return;
    }
#endif
    scores_generic(g, k_codes, k_scale, k_min, token_exp, block_tables, n_paged, q, scores, stride, bh_start,
                   bh_end);
}

void hack_paged_pv(const Geometry *g, const uint8_t *v_codes, const half *v_scale, const half *v_min,
                    const uint8_t *token_exp, const int32_t *block_tables, const int64_t *n_paged,
                    const float *probs, int64_t stride, float *out, int64_t bh_start, int64_t bh_end) {
#ifdef HAVE_VNNI
    if (vnni_fits(g, PV_VNNI_BITS)) {
        pv_vnni(g, v_codes, v_scale, v_min, token_exp, block_tables, n_paged, probs, stride, out, bh_start, bh_end);
        return;
    }
#endif
    pv_generic(g, v_codes, v_scale, v_min, token_exp, block_tables, n_paged, probs, stride, out, bh_start, bh_end);
}
