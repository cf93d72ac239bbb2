/* Paged decode attention for the CPU platform: every one-token sequence of a step attends to its
 * keys and values where they lie in the paged cache, block by block, with no gathered copy.
 * Built at run time by devices/cpu_paged_attention.py (cc -O3 -march=native -fopenmp) and
 * called once per layer per step through ctypes.
 *
 * Layout (models/attention.py): k_cache, v_cache [kv_heads, slots, head_dim], slot = block *
 * block_size + offset; q and out [seqs, heads, head_dim]; tables [seqs, max_blocks] int64;
 * lens [seqs] int64 (keys to attend to, the new one included). Query head h reads KV head
 * h / (heads / kv_heads). Scores, softmax and the weighted sum are computed in fp32; bf16
 * values are widened on load and the output rounded to nearest even. On AVX-512 CPUs, when a
 * block holds whole 16-key runs, keys and values are taken a run at a time (scores_bf16 with
 * AVX512-BF16, scores_f32, values_run16); elsewhere one key at a time (the plain loops). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#define TESSERA_AVX512 1
#if defined(__AVX512BF16__)
#define TESSERA_DPBF16 1
#endif
#endif

static inline __attribute__((always_inline)) void load_row(const void *base, int64_t index, int64_t dim, int is_bf16,
                            float *restrict dst) {
    if (is_bf16) {
        const uint16_t *src = (const uint16_t *)base + index * dim;
        for (int64_t d = 0; d < dim; d++) {
            union { uint32_t u; float f; } v;
            v.u = (uint32_t)src[d] << 16;
            dst[d] = v.f;
        }
    } else {
        memcpy(dst, (const float *)base + index * dim, (size_t)dim * sizeof(float));
    }
}

static inline __attribute__((always_inline)) void store_row(void *base, int64_t index, int64_t dim, int is_bf16,
                             const float *restrict src, float factor) {
    if (is_bf16) {
        uint16_t *dst = (uint16_t *)base + index * dim;
        for (int64_t d = 0; d < dim; d++) {
            union { uint32_t u; float f; } v;
            v.f = src[d] * factor;
            dst[d] = (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16);
        }
    } else {
        float *dst = (float *)base + index * dim;
        for (int64_t d = 0; d < dim; d++) dst[d] = src[d] * factor;
    }
}

#ifdef TESSERA_AVX512
/* Where the next 16-key run's rows start (another block, anywhere in the cache): prefetched
 * while this run is worked on. */
static inline void prefetch_run(const char *cache, int64_t row_bytes, const int64_t *table,
                                int64_t t1, int64_t len, int64_t cache_row0, int64_t block_size) {
    if (t1 >= len) return;
    const char *next = cache + (cache_row0 + table[t1 / block_size] * block_size +
                                t1 % block_size) * row_bytes;
    for (int64_t b = 0; b < 16 * row_bytes; b += 64) _mm_prefetch(next + b, _MM_HINT_T0);
}

/* Offsets of a 16-key run's rows in units of `stride` (elements a row), for gathers. */
static inline __m512i run_rows(int64_t stride) {
    return _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        _mm512_set1_epi32((int)stride));
}
#endif

#ifdef TESSERA_DPBF16
/* bf16 scores of `group` (<= 16) query heads against the keys of one sequence, 16 keys at a time:
 * a block's 16 rows lie together in the cache, so each pair of dimensions is gathered across the
 * 16 keys into one register and multiplied into every head's 16 scores with one AVX512-BF16
 * dot-product instruction (products exact in fp32, summed in fp32). The plain loop below reduces
 * across dimensions once per key and head, which made this kernel compute-bound at long histories. */
static void scores_bf16(const uint16_t *q_rows, const uint16_t *k_cache, const int64_t *table,
                        int64_t len, int64_t group, int64_t head_dim, int64_t cache_row0,
                        int64_t block_size, float scale, float *scores) {
    const int64_t pairs = head_dim / 2;
    const __m512i rows = run_rows(pairs);
    const uint32_t *q32 = (const uint32_t *)q_rows;
    for (int64_t t0 = 0; t0 < len; t0 += 16) {
        const int64_t n = len - t0 < 16 ? len - t0 : 16;
        const __mmask16 mask = (__mmask16)((1u << n) - 1u);
        const int64_t first = table[t0 / block_size] * block_size + t0 % block_size;
        const uint32_t *k32 = (const uint32_t *)(k_cache + (cache_row0 + first) * head_dim);
        prefetch_run((const char *)k_cache, head_dim * 2, table, t0 + 16, len, cache_row0,
                     block_size);
        __m512 acc[16];
        for (int64_t g = 0; g < group; g++) acc[g] = _mm512_setzero_ps();
        for (int64_t p = 0; p < pairs; p++) {
            const __m512i keys = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, rows,
                                                             k32 + p, 4);
            for (int64_t g = 0; g < group; g++) {
                const __m512i qp = _mm512_set1_epi32((int)q32[g * pairs + p]);
                acc[g] = _mm512_dpbf16_ps(acc[g], (__m512bh)keys, (__m512bh)qp);
            }
        }
        for (int64_t g = 0; g < group; g++)
            _mm512_mask_storeu_ps(scores + g * len + t0, mask,
                                  _mm512_mul_ps(acc[g], _mm512_set1_ps(scale)));
    }
}
#endif /* TESSERA_DPBF16 */

#ifdef TESSERA_AVX512
/* fp32 scores as scores_bf16 computes bf16 ones: each dimension gathered across 16 keys, one
 * fused multiply-add per dimension and head. */
static void scores_f32(const float *q_rows, const float *k_cache, const int64_t *table,
                       int64_t len, int64_t group, int64_t head_dim, int64_t cache_row0,
                       int64_t block_size, float scale, float *scores) {
    const __m512i rows = run_rows(head_dim);
    for (int64_t t0 = 0; t0 < len; t0 += 16) {
        const int64_t n = len - t0 < 16 ? len - t0 : 16;
        const __mmask16 mask = (__mmask16)((1u << n) - 1u);
        const int64_t first = table[t0 / block_size] * block_size + t0 % block_size;
        const float *k = k_cache + (cache_row0 + first) * head_dim;
        prefetch_run((const char *)k_cache, head_dim * 4, table, t0 + 16, len, cache_row0,
                     block_size);
        __m512 acc[16];
        for (int64_t g = 0; g < group; g++) acc[g] = _mm512_setzero_ps();
        for (int64_t d = 0; d < head_dim; d++) {
            const __m512 keys = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, rows, k + d, 4);
            for (int64_t g = 0; g < group; g++)
                acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(q_rows[g * head_dim + d]), keys, acc[g]);
        }
        for (int64_t g = 0; g < group; g++)
            _mm512_mask_storeu_ps(scores + g * len + t0, mask,
                                  _mm512_mul_ps(acc[g], _mm512_set1_ps(scale)));
    }
}

/* acc[g] += sum over keys t of p[g][t] * v_t, 16 keys at a time: each head's accumulator is held
 * in registers across a run of 16 value rows (bf16 rows widened to fp32 into `vf` once first);
 * the next run's rows are prefetched meanwhile. head_dim a multiple of 16, at most 256. */
static void values_run16(const void *v_cache, const int64_t *table, int64_t len, int64_t group,
                         int64_t head_dim, int64_t cache_row0, int64_t block_size,
                         const float *probs, float *acc, float *vf, int is_bf16) {
    const int64_t row_bytes = head_dim * (is_bf16 ? 2 : 4);
    for (int64_t t0 = 0; t0 < len; t0 += 16) {
        const int64_t n = len - t0 < 16 ? len - t0 : 16;
        const int64_t first = cache_row0 + table[t0 / block_size] * block_size + t0 % block_size;
        prefetch_run((const char *)v_cache, row_bytes, table, t0 + 16, len, cache_row0,
                     block_size);
        const float *src = (const float *)v_cache + first * head_dim;
        if (is_bf16) {
            const uint16_t *rows = (const uint16_t *)v_cache + first * head_dim;
            for (int64_t t = 0; t < n; t++)
                for (int64_t d = 0; d < head_dim; d += 16) {
                    const __m256i raw = _mm256_loadu_si256((const __m256i *)(rows + t * head_dim + d));
                    const __m512i wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16);
                    _mm512_storeu_ps(vf + t * head_dim + d, _mm512_castsi512_ps(wide));
                }
            src = vf;
        }
        for (int64_t g = 0; g < group; g++) {
            const float *pg = probs + g * len + t0;
            float *ag = acc + g * head_dim;
            for (int64_t d = 0; d < head_dim; d += 16) {
                __m512 a = _mm512_loadu_ps(ag + d);
                for (int64_t t = 0; t < n; t++)
                    a = _mm512_fmadd_ps(_mm512_set1_ps(pg[t]), _mm512_loadu_ps(src + t * head_dim + d), a);
                _mm512_storeu_ps(ag + d, a);
            }
        }
    }
}
#endif /* TESSERA_AVX512 */

/* One (sequence, KV head) pair: its `group` query heads attend to its `len` keys.
 * Returns 0, or -1 when a work buffer could not be allocated. Always inlined so that the
 * callers below specialise it on constant head sizes (the inner loops then fully vectorise). */
static inline __attribute__((always_inline)) int attend(
    const void *q, const void *k_cache, const void *v_cache, const int64_t *table, int64_t len,
    void *out, int64_t s, int64_t kh, int64_t heads, int64_t group, const int64_t head_dim,
    int64_t slots, int64_t block_size, float scale, int is_bf16) {
    float *qf = malloc(sizeof(float) * (size_t)(2 * group * head_dim + head_dim + group));
    float *scores = malloc(sizeof(float) * (size_t)(group * (len > 0 ? len : 1)));
    if (qf == NULL || scores == NULL) {
        free(qf);
        free(scores);
        return -1;
    }
    float *acc = qf + group * head_dim;
    float *row = acc + group * head_dim;
    float *sum = row + head_dim;
    const int64_t first_head = kh * group;
    const int64_t cache_row0 = kh * slots;
    /* 16-key runs: a block holds whole runs, and the heads' accumulators fit in registers */
    const int runs = block_size % 16 == 0 && group <= 16;
#ifdef TESSERA_DPBF16
    const int fast_bf16 = runs && is_bf16 && head_dim % 2 == 0;
#else
    const int fast_bf16 = 0;
#endif
#ifdef TESSERA_AVX512
    const int fast_f32 = runs && !is_bf16;
#else
    const int fast_f32 = 0;
#endif
    if (fast_bf16) {
#ifdef TESSERA_DPBF16
        scores_bf16((const uint16_t *)q + (s * heads + first_head) * head_dim,
                    (const uint16_t *)k_cache, table, len, group, head_dim, cache_row0,
                    block_size, scale, scores);
#endif
    } else if (fast_f32) {
#ifdef TESSERA_AVX512
        scores_f32((const float *)q + (s * heads + first_head) * head_dim,
                   (const float *)k_cache, table, len, group, head_dim, cache_row0, block_size,
                   scale, scores);
#endif
    } else {
        for (int64_t g = 0; g < group; g++)
            load_row(q, s * heads + first_head + g, head_dim, is_bf16, qf + g * head_dim);
        for (int64_t t = 0; t < len; t++) {
            const int64_t slot = table[t / block_size] * block_size + t % block_size;
            load_row(k_cache, cache_row0 + slot, head_dim, is_bf16, row);
            for (int64_t g = 0; g < group; g++) {
                const float *qg = qf + g * head_dim;
                float dot = 0.0f;
                for (int64_t d = 0; d < head_dim; d++) dot += qg[d] * row[d];
                scores[g * len + t] = dot * scale;
            }
        }
    }
    for (int64_t g = 0; g < group; g++) {
        float *sg = scores + g * len;
        float top = -INFINITY;
        for (int64_t t = 0; t < len; t++) top = sg[t] > top ? sg[t] : top;
        float total = 0.0f;
        for (int64_t t = 0; t < len; t++) {
            sg[t] = expf(sg[t] - top);
            total += sg[t];
        }
        sum[g] = total;
    }
    memset(acc, 0, sizeof(float) * (size_t)(group * head_dim));
    int values_done = 0;
#ifdef TESSERA_AVX512
    if (block_size % 16 == 0 && head_dim % 16 == 0 && head_dim <= 256) {
        float vf[16 * 256];
        values_run16(v_cache, table, len, group, head_dim, cache_row0, block_size, scores, acc,
                     vf, is_bf16);
        values_done = 1;
    }
#endif
    for (int64_t t = 0; !values_done && t < len; t++) {
        const int64_t slot = table[t / block_size] * block_size + t % block_size;
        load_row(v_cache, cache_row0 + slot, head_dim, is_bf16, row);
        for (int64_t g = 0; g < group; g++) {
            const float p = scores[g * len + t];
            float *ag = acc + g * head_dim;
            for (int64_t d = 0; d < head_dim; d++) ag[d] += p * row[d];
        }
    }
    for (int64_t g = 0; g < group; g++)
        store_row(out, s * heads + first_head + g, head_dim, is_bf16, acc + g * head_dim,
                  sum[g] > 0.0f ? 1.0f / sum[g] : 0.0f);
    free(qf);
    free(scores);
    return 0;
}

/* Returns 0, or -1 when a work buffer could not be allocated. */
int tessera_paged_decode(const void *q, const void *k_cache, const void *v_cache,
                         const int64_t *tables, const int64_t *lens, void *out, int64_t seqs,
                         int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t slots,
                         int64_t max_blocks, int64_t block_size, float scale, int is_bf16,
                         int threads) {
    const int64_t group = heads / kv_heads;
    int failed = 0;
#pragma omp parallel for collapse(2) schedule(dynamic) num_threads(threads)
    for (int64_t s = 0; s < seqs; s++) {
        for (int64_t kh = 0; kh < kv_heads; kh++) {
            const int64_t *table = tables + s * max_blocks;
            int status;
            if (head_dim == 64)
                status = attend(q, k_cache, v_cache, table, lens[s], out, s, kh, heads, group, 64,
                                slots, block_size, scale, is_bf16);
            else if (head_dim == 128)
                status = attend(q, k_cache, v_cache, table, lens[s], out, s, kh, heads, group,
                                128, slots, block_size, scale, is_bf16);
            else
                status = attend(q, k_cache, v_cache, table, lens[s], out, s, kh, heads, group,
                                head_dim, slots, block_size, scale, is_bf16);
            if (status != 0) {
#pragma omp atomic write
                failed = 1;
            }
        }
    }
    return failed ? -1 : 0;
}
