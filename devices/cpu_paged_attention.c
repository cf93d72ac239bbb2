/* Paged decode attention for the CPU platform: every one-token sequence of a step attends to its
 * keys and values where they lie in the paged cache, block by block, with no gathered copy.
 * Built at run time by devices/cpu_paged_attention.py (cc -O3 -march=native -fopenmp) and
 * called once per layer per step through ctypes.
 *
 * Layout (models/attention.py): k_cache, v_cache [kv_heads, slots, head_dim], slot = block *
 * block_size + offset; q and out [seqs, heads, head_dim]; tables [seqs, max_blocks] int64;
 * lens [seqs] int64 (keys to attend to, the new one included). Query head h reads KV head
 * h / (heads / kv_heads). Scores, softmax and the weighted sum are computed in fp32; bf16
 * values are widened on load and the output rounded to nearest even. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
    for (int64_t g = 0; g < group; g++)
        load_row(q, s * heads + first_head + g, head_dim, is_bf16, qf + g * head_dim);
    const int64_t cache_row0 = kh * slots;
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
    for (int64_t t = 0; t < len; t++) {
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
