/* Fused elementwise steps of a decoder layer for the CPU platform, each one call instead of the
 * eight to fifteen small torch operations it replaces (a decode step of a small model is
 * dominated by such per-operation costs). Built at run time by devices/cpu_fused_ops.py and
 * called through ctypes.
 *
 * Results equal torch's bit for bit in bf16 where torch rounds: every intermediate that torch
 * stores in bf16 is rounded to nearest even here at the same point. Built without -ffast-math
 * and with -ffp-contract=off, so fp32 products are not fused into FMAs either; only the sums of
 * squares in RMSNorm are added in another order than torch's.
 *
 * dtype: 0 = fp32, 1 = bf16. */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float widen(const void *base, int64_t i, int is_bf16) {
    if (!is_bf16) return ((const float *)base)[i];
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)((const uint16_t *)base)[i] << 16;
    return v.f;
}

/* The value torch would hold after storing f in the dtype. */
static inline float round_to(float f, int is_bf16) {
    if (!is_bf16) return f;
    union { uint32_t u; float f; } v;
    v.f = f;
    const uint32_t rounded = ((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16) << 16;
    v.u = (v.u & 0x7FFFFFFFu) > 0x7F800000u ? v.u : rounded; /* NaN stays NaN */
    return v.f;
}

static inline void put(void *base, int64_t i, float f, int is_bf16) {
    if (!is_bf16) {
        ((float *)base)[i] = f;
        return;
    }
    union { uint32_t u; float f; } v;
    v.f = round_to(f, 1);
    ((uint16_t *)base)[i] = (uint16_t)(v.u >> 16);
}

#define LANES 16 /* partial sums of squares: one vector register's worth, so loops vectorize */

/* One row of RMSNorm; always inlined with a constant is_bf16, so each dtype gets its own
 * branch-free loops that the compiler vectorizes (16 partial sums, added pairwise at the end). */
static inline __attribute__((always_inline)) void rms_row(
    const void *input, const void *delta, const void *weight, void *sum_out, void *out,
    int64_t base, int64_t hidden, float eps, const int is_bf16) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= hidden; i += LANES) {
        for (int j = 0; j < LANES; j++) {
            float x = widen(input, base + i + j, is_bf16);
            if (delta) {
                x = round_to(x + widen(delta, base + i + j, is_bf16), is_bf16);
                put(sum_out, base + i + j, x, is_bf16);
            }
            acc[j] += x * x;
        }
    }
    for (; i < hidden; i++) {
        float x = widen(input, base + i, is_bf16);
        if (delta) {
            x = round_to(x + widen(delta, base + i, is_bf16), is_bf16);
            put(sum_out, base + i, x, is_bf16);
        }
        acc[i % LANES] += x * x;
    }
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int j = 0; j < width; j++) acc[j] += acc[j + width];
    const float inv = 1.0f / sqrtf(acc[0] / (float)hidden + eps);
    const void *src = delta ? sum_out : input;
    for (i = 0; i < hidden; i++) {
        const float h = round_to(widen(src, base + i, is_bf16) * inv, is_bf16);
        put(out, base + i, widen(weight, i, is_bf16) * h, is_bf16);
    }
}

/* out = weight * dtype(x * rsqrt(mean(x^2) + eps)) per row, with x = input (+ delta, stored in
 * sum_out, when delta is given): models/layers.py RMSNorm, after the residual add. */
int tessera_rms_norm(const void *input, const void *delta, const void *weight, void *sum_out,
                     void *out, int64_t rows, int64_t hidden, float eps, int dtype, int threads) {
#pragma omp parallel for num_threads(threads) if (rows >= 16) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        if (dtype == 1)
            rms_row(input, delta, weight, sum_out, out, r * hidden, hidden, eps, 1);
        else
            rms_row(input, delta, weight, sum_out, out, r * hidden, hidden, eps, 0);
    }
    return 0;
}

/* One head's rotate_half rotation (models/layers.py apply_rotary): x * cos + cat(-x2, x1) * sin,
 * each product and the sum rounded to the dtype as torch stores them. Inlined with a constant
 * is_bf16, each half's loop is branch-free and vectorizes. */
static inline __attribute__((always_inline)) void rotate(
    const void *src, int64_t at, const void *cos, const void *sin, int64_t angle_row,
    int64_t dim, void *dst, int64_t to, const int is_bf16) {
    const int64_t half = dim / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = round_to(widen(src, at + i, is_bf16) * widen(cos, angle_row + i, is_bf16),
                                 is_bf16);
        const float b = round_to(
            -widen(src, at + i + half, is_bf16) * widen(sin, angle_row + i, is_bf16), is_bf16);
        put(dst, to + i, a + b, is_bf16);
    }
    for (int64_t i = half; i < dim; i++) {
        const float a = round_to(widen(src, at + i, is_bf16) * widen(cos, angle_row + i, is_bf16),
                                 is_bf16);
        const float b = round_to(
            widen(src, at + i - half, is_bf16) * widen(sin, angle_row + i, is_bf16), is_bf16);
        put(dst, to + i, a + b, is_bf16);
    }
}

/* One token of tessera_rope_store, inlined per dtype (see rotate). */
static inline __attribute__((always_inline)) void rope_token(
    const void *qkv, const void *cos, const void *sin, void *q_out, void *k_out, void *k_cache,
    void *v_cache, int64_t t, int64_t slot, int64_t heads, int64_t kv_heads, int64_t dim,
    int64_t cache_slots, const int is_bf16) {
    const int64_t in = t * (heads + 2 * kv_heads) * dim, angles = t * dim;
    const size_t elem = is_bf16 ? 2 : 4;
    for (int64_t h = 0; h < heads; h++)
        rotate(qkv, in + h * dim, cos, sin, angles, dim, q_out, (t * heads + h) * dim, is_bf16);
    for (int64_t h = 0; h < kv_heads; h++) {
        const int64_t to = (h * cache_slots + slot) * dim;
        rotate(qkv, in + (heads + h) * dim, cos, sin, angles, dim, k_cache, to, is_bf16);
        if (k_out)
            memcpy((char *)k_out + (t * kv_heads + h) * dim * elem,
                   (const char *)k_cache + to * elem, (size_t)dim * elem);
        memcpy((char *)v_cache + to * elem,
               (const char *)qkv + (in + (heads + kv_heads + h) * dim) * elem,
               (size_t)dim * elem);
    }
}

/* The new tokens' q/k/v as qkv_proj wrote them, [tokens, (heads + 2 kv_heads) * dim]: q rotated
 * into q_out [tokens, heads, dim]; k rotated and v copied into the paged caches
 * [kv_heads, cache_slots, dim] at slots[t], and k also into k_out [tokens, kv_heads, dim] when
 * given (prefills attend to it directly). cos/sin [tokens, dim]. Returns 1, having written
 * nothing, when a slot lies outside the cache. */
int tessera_rope_store(const void *qkv, const void *cos, const void *sin, void *q_out,
                       void *k_out, void *k_cache, void *v_cache, const int64_t *slots,
                       int64_t tokens,
                       int64_t heads, int64_t kv_heads, int64_t dim, int64_t cache_slots,
                       int dtype, int threads) {
    for (int64_t t = 0; t < tokens; t++)
        if (slots[t] < 0 || slots[t] >= cache_slots) return 1; /* nothing written */
#pragma omp parallel for num_threads(threads) if (tokens >= 16) schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        if (dtype == 1)
            rope_token(qkv, cos, sin, q_out, k_out, k_cache, v_cache, t, slots[t], heads,
                       kv_heads, dim, cache_slots, 1);
        else
            rope_token(qkv, cos, sin, q_out, k_out, k_cache, v_cache, t, slots[t], heads,
                       kv_heads, dim, cache_slots, 0);
    }
    return 0;
}
