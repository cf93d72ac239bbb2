/* Prefill attention for the CPU platform on CPUs with AMX: many query rows against many keys
 * (prompts, prefill chunks after a cached prefix, the vision tower's windows and full blocks),
 * bf16 in and out, fp32 scores, softmax and sums. Built at run time by
 * devices/cpu_prefill_attention.py (cc -O3 -march=native -fopenmp) and called through ctypes.
 *
 * Queries come in segments that attend only to their own keys: segment s has q_lens[s] query
 * rows (consecutive in q) and k_lens[s] keys (consecutive rows of k and v, or the rows that
 * key_index names: the paged cache). Causal: query i attends to keys j <= i + k_len - q_len.
 * Query head h reads KV head h / (heads / kv_heads). Any row and head strides (elements);
 * the last dimension must be contiguous.
 *
 * Keys and values are first packed per KV head into AMX's pair-interleaved B layout (once a
 * call, shared by the head's query heads). Then each task, 32 query rows of one head, takes its
 * keys CHUNK at a time (flash attention, so scores and probabilities stay in L1): scores with
 * tile products (S = Q K^T, fp32), a softmax step against each row's running maximum, the
 * probabilities rounded to bf16 (as SDPA's CPU kernel does), and P V with tile products added
 * into the rescaled fp32 output. Keys past the causal limit are not visited.
 *
 * Measured on a 2-core AMX Xeon against SDPA (which also runs oneDNN's AMX kernels): a 654-token
 * causal prompt (14/2 heads, D 64) ~1.8x faster, a vision tower's 64-patch windows ~3x, one
 * 2,116-patch full block ~1.1x. Per 32 x 32 block of scores the cost is ~40% softmax (exp),
 * ~30% S with its tile stores, the rest P V; tile stores and exp bound it, not the products.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && \
    defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define TESSERA_AMX 1
#endif

#define ROWS 32   /* query rows a task; keys a block */
#define CHUNK 256 /* keys a softmax step (128 and 64 measured slower for causal prompts) */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* 1 where this build has the AMX path and the OS lets this process use AMX tiles. */
int tessera_prefill_supported(void) {
#ifdef TESSERA_AMX
    static int state = -1;
    if (state < 0) state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return state;
#else
    return 0;
#endif
}

#ifdef TESSERA_AMX
typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed, aligned(64))) tile_config;

/* Eight 16 x 64-byte tiles: 0-3 accumulate a 32 x 32 fp32 block, 4-5 hold A (rows 0-15,
 * 16-31), 6-7 hold B (columns 0-15, 16-31). */
static void configure_tiles(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
}

static inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

/* Rows [first, first + count) of one KV head (count <= ROWS) copied into tmp [ROWS][dp],
 * zero-padded in both directions. */
static void gather_rows(const uint16_t *base, int64_t row_stride, const int64_t *index,
                        int64_t first, int64_t count, int64_t dim, int64_t dp, uint16_t *tmp) {
    memset(tmp, 0, (size_t)(ROWS * dp) * sizeof(uint16_t));
    for (int64_t r = 0; r < count; r++) {
        int64_t row = index ? index[first + r] : first + r;
        memcpy(tmp + r * dp, base + row * row_stride, (size_t)dim * sizeof(uint16_t));
    }
}

/* 32 keys into two 16-key B blocks of K^T: per 32-dimension step a 16 x 16 tile of dimension
 * pairs (row = pair, column = key). */
static void pack_keys(const uint16_t *tmp, int64_t dp, uint16_t *dst) {
    const int64_t steps = dp / 32;
    const __m512i keys = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        _mm512_set1_epi32((int)(dp / 2)));
    for (int64_t half = 0; half < 2; half++) {
        const int *src = (const int *)(tmp + half * 16 * dp);
        for (int64_t s = 0; s < steps; s++) {
            int *tile = (int *)(dst + (half * steps + s) * 512);
            for (int64_t pair = 0; pair < 16; pair++) {
                __m512i v = _mm512_i32gather_epi32(keys, src + s * 16 + pair, 4);
                _mm512_store_si512((void *)(tile + pair * 16), v);
            }
        }
    }
}

/* 32 values into B tiles of V: per 16-column block a 16 x 16 tile of key pairs (row = pair of
 * keys, column = dimension, the two keys' values side by side). */
static void pack_values(const uint16_t *tmp, int64_t dp, uint16_t *dst) {
    for (int64_t c = 0; c < dp / 16; c++) {
        int *tile = (int *)(dst + c * 512);
        for (int64_t pair = 0; pair < 16; pair++) {
            __m512i even = _mm512_cvtepu16_epi32(
                _mm256_loadu_si256((const __m256i *)(tmp + (2 * pair) * dp + c * 16)));
            __m512i odd = _mm512_cvtepu16_epi32(
                _mm256_loadu_si256((const __m256i *)(tmp + (2 * pair + 1) * dp + c * 16)));
            _mm512_store_si512((void *)(tile + pair * 16),
                               _mm512_or_si512(even, _mm512_slli_epi32(odd, 16)));
        }
    }
}

/* 2^x for x <= 0: x split into a whole number and a fraction in [-0.5, 0.5], a degree-5 Taylor
 * polynomial of 2^f (relative error < 3e-6, below bf16's 4e-3 that P is rounded to), scaled by
 * 2^whole (scalef gives 0 for very negative x, so no clamp). */
static inline __m512 exp2_neg(__m512 x) {
    __m512 whole = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(x, whole);
    __m512 p = _mm512_set1_ps(1.3333558e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, whole);
}

static inline __mmask16 first_lanes(int64_t n) {
    return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

/* One row of a key chunk: scores S[0:limit] -> bf16 probabilities P[0:width] (0 past limit)
 * against the row's running maximum *m (in units of c, the scale times log2(e)), which moves
 * up to this chunk's maximum; *l, the running sum, follows. Returns the factor that rescales
 * what was summed against the old maximum. */
static float softmax_chunk(const float *s, int64_t limit, int64_t width, float c, float *m,
                           float *l, uint16_t *p) {
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < limit; j += 16)
        mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, first_lanes(limit - j), s + j));
    float top = _mm512_reduce_max_ps(mx) * c;
    float alpha = 1.0f;
    if (top > *m) {
        alpha = *m == -INFINITY ? 0.0f : exp2f(*m - top);
        *m = top;
    }
    const __m512 shift = _mm512_set1_ps(*m), cv = _mm512_set1_ps(c);
    __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
    const int64_t whole = limit / 32 * 32;
    int64_t j = 0;
    for (; j < whole; j += 32) {
        __m512 e0 = exp2_neg(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), cv, shift));
        __m512 e1 = exp2_neg(_mm512_fmsub_ps(_mm512_loadu_ps(s + j + 16), cv, shift));
        sum0 = _mm512_add_ps(sum0, e0);
        sum1 = _mm512_add_ps(sum1, e1);
        _mm512_storeu_si512((void *)(p + j), (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
    }
    if (j < limit) { /* the run of 32 that the limit cuts */
        __mmask16 k0 = first_lanes(limit - j), k1 = first_lanes(limit - j - 16);
        __m512 x0 = _mm512_fmsub_ps(_mm512_loadu_ps(s + j), cv, shift);
        __m512 x1 = _mm512_fmsub_ps(_mm512_loadu_ps(s + j + 16), cv, shift);
        __m512 e0 = _mm512_maskz_mov_ps(k0, exp2_neg(x0));
        __m512 e1 = _mm512_maskz_mov_ps(k1, exp2_neg(x1));
        sum0 = _mm512_add_ps(sum0, e0);
        sum1 = _mm512_add_ps(sum1, e1);
        _mm512_storeu_si512((void *)(p + j), (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
        j += 32;
    }
    for (; j < width; j += 32) _mm512_storeu_si512((void *)(p + j), _mm512_setzero_si512());
    *l = *l * alpha + _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1));
    return alpha;
}

typedef struct {
    const uint16_t *q, *kp, *vp;
    uint16_t *out;
    int64_t q_row, q_head, o_row, o_head;
    int64_t heads, group, head_dim, dp, causal;
    float c; /* scale * log2(e) */
} problem;

/* Per-thread buffers of a task, sized to stay in L1 with the tiles' operands. */
typedef struct {
    uint16_t *q;  /* [ROWS][dp] */
    float *s;     /* [ROWS][CHUNK] scores of a key chunk */
    uint16_t *p;  /* [ROWS][CHUNK] */
    float *o;     /* [ROWS][dp] running output */
    float *part;  /* [ROWS][dp] one chunk's P V */
    float *row;   /* [3][ROWS]: running max, running sum, this chunk's rescale factor */
} scratch;

/* S[:, 0:width] = Q K^T for `width` keys (a multiple of 32) packed at kp. */
static void chunk_scores(const scratch *w, int64_t dp, const uint16_t *kp, int64_t width) {
    const int64_t steps = dp / 32;
    for (int64_t kb = 0; kb < width / ROWS; kb++) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t s = 0; s < steps; s++) {
            _tile_loadd(4, w->q + s * 32, dp * 2);
            _tile_loadd(5, w->q + 16 * dp + s * 32, dp * 2);
            _tile_loadd(6, kp + (kb * 2 * steps + s) * 512, 64);
            _tile_loadd(7, kp + ((kb * 2 + 1) * steps + s) * 512, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
        float *s0 = w->s + kb * ROWS;
        _tile_stored(0, s0, CHUNK * 4);
        _tile_stored(1, s0 + 16, CHUNK * 4);
        _tile_stored(2, s0 + 16 * CHUNK, CHUNK * 4);
        _tile_stored(3, s0 + 16 * CHUNK + 16, CHUNK * 4);
    }
}

/* part = P V for `width` keys whose values are packed at vp. */
static void chunk_values(const scratch *w, int64_t dp, const uint16_t *vp, int64_t width) {
    for (int64_t cb = 0; cb < dp / 32; cb++) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t kb = 0; kb < width / ROWS; kb++) {
            _tile_loadd(4, w->p + kb * ROWS, CHUNK * 2);
            _tile_loadd(5, w->p + 16 * CHUNK + kb * ROWS, CHUNK * 2);
            _tile_loadd(6, vp + (kb * (dp / 16) + 2 * cb) * 512, 64);
            _tile_loadd(7, vp + (kb * (dp / 16) + 2 * cb + 1) * 512, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
        float *o0 = w->part + cb * 32;
        _tile_stored(0, o0, dp * 4);
        _tile_stored(1, o0 + 16, dp * 4);
        _tile_stored(2, o0 + 16 * dp, dp * 4);
        _tile_stored(3, o0 + 16 * dp + 16, dp * 4);
    }
}

/* Query rows [r0, r0 + nq) of head h in a segment whose first query row is q0, with k_len keys
 * packed at kp / vp (offsets of this segment and KV head already applied): key chunks in turn,
 * each row's softmax kept with a running maximum and sum (flash attention). */
static void attend_task(const problem *pr, const scratch *w, int64_t h, int64_t q0, int64_t q_len,
                        int64_t k_len, int64_t r0, const uint16_t *kp, const uint16_t *vp) {
    const int64_t dp = pr->dp, nq = q_len - r0 < ROWS ? q_len - r0 : ROWS;
    const int64_t offset = k_len - q_len;
    int64_t nk = pr->causal ? offset + r0 + nq : k_len;
    if (nk > k_len) nk = k_len;
    const int64_t width = round_up(nk, ROWS);
    float *m = w->row, *l = w->row + ROWS, *alpha = w->row + 2 * ROWS;
    memset(w->q, 0, (size_t)(ROWS * dp) * sizeof(uint16_t));
    memset(w->o, 0, (size_t)(ROWS * dp) * sizeof(float));
    memset(w->p + nq * CHUNK, 0, (size_t)((ROWS - nq) * CHUNK) * sizeof(uint16_t));
    for (int64_t i = 0; i < nq; i++) {
        memcpy(w->q + i * dp, pr->q + (q0 + r0 + i) * pr->q_row + h * pr->q_head,
               (size_t)pr->head_dim * sizeof(uint16_t));
        m[i] = -INFINITY, l[i] = 0.0f;
    }
    for (int64_t c0 = 0; c0 < width; c0 += CHUNK) {
        const int64_t cw = width - c0 < CHUNK ? width - c0 : CHUNK;
        chunk_scores(w, dp, kp + c0 * dp, cw);
        for (int64_t i = 0; i < nq; i++) {
            int64_t limit = (pr->causal ? offset + r0 + i + 1 : k_len) - c0;
            if (limit > cw) limit = cw;
            if (limit <= 0) { /* a causal row whose keys all came in earlier chunks */
                memset(w->p + i * CHUNK, 0, (size_t)cw * sizeof(uint16_t));
                alpha[i] = 1.0f;
                continue;
            }
            alpha[i] = softmax_chunk(w->s + i * CHUNK, limit, cw, pr->c, m + i, l + i,
                                     w->p + i * CHUNK);
        }
        chunk_values(w, dp, vp + c0 * dp, cw);
        for (int64_t i = 0; i < nq; i++) {
            const __m512 a = _mm512_set1_ps(alpha[i]);
            for (int64_t d = 0; d < dp; d += 16) {
                float *o = w->o + i * dp + d;
                _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_loadu_ps(o), a,
                                                    _mm512_loadu_ps(w->part + i * dp + d)));
            }
        }
    }
    for (int64_t i = 0; i < nq; i++) {
        uint16_t *dst = pr->out + (q0 + r0 + i) * pr->o_row + h * pr->o_head;
        const __m512 inv = _mm512_set1_ps(1.0f / l[i]);
        for (int64_t d = 0; d < pr->head_dim; d += 16) {
            int64_t left = pr->head_dim - d;
            __mmask16 k = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
            __m256bh o = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(w->o + i * dp + d), inv));
            _mm256_mask_storeu_epi16(dst + d, k, (__m256i)o);
        }
    }
}
#endif

/* Returns 0, 1 where this build or OS has no AMX path, 2 where a buffer could not be allocated. */
int tessera_prefill_attention(const void *q, const void *k, const void *v, void *out,
                              const int64_t *key_index, const int64_t *q_lens,
                              const int64_t *k_lens, int64_t segments, int64_t heads,
                              int64_t kv_heads, int64_t head_dim, int64_t q_row, int64_t q_head,
                              int64_t k_row, int64_t k_head, int64_t v_row, int64_t v_head,
                              int64_t o_row, int64_t o_head, int causal, float scale,
                              int threads) {
#ifndef TESSERA_AMX
    (void)q, (void)k, (void)v, (void)out, (void)key_index, (void)q_lens, (void)k_lens;
    (void)segments, (void)heads, (void)kv_heads, (void)head_dim, (void)q_row, (void)q_head;
    (void)k_row, (void)k_head, (void)v_row, (void)v_head, (void)o_row, (void)o_head;
    (void)causal, (void)scale, (void)threads;
    return 1;
#else
    if (!tessera_prefill_supported()) return 1;
    const int64_t dp = round_up(head_dim, 32);
    /* Per segment: first query row, first key (input rows), first packed key, query tasks. */
    int64_t *q0 = malloc((size_t)(4 * segments + 1) * sizeof(int64_t));
    if (!q0) return 2;
    int64_t *k0 = q0 + segments, *pk0 = k0 + segments, *task0 = pk0 + segments;
    int64_t qs = 0, ks = 0, pks = 0, tasks = 0;
    for (int64_t s = 0; s < segments; s++) {
        q0[s] = qs, k0[s] = ks, pk0[s] = pks, task0[s] = tasks;
        qs += q_lens[s], ks += k_lens[s], pks += round_up(k_lens[s], ROWS);
        tasks += (q_lens[s] + ROWS - 1) / ROWS;
    }
    task0[segments] = tasks;
    const size_t packed = (size_t)(kv_heads * pks * dp);
    uint16_t *kp = aligned_alloc(64, packed * sizeof(uint16_t));
    uint16_t *vp = aligned_alloc(64, packed * sizeof(uint16_t));
    int failed = kp == NULL || vp == NULL;
    problem pr = {q, kp, vp, out, q_row, q_head, o_row, o_head, heads, heads / kv_heads,
                  head_dim, dp, causal, scale * 1.4426950408889634f};
    const int64_t key_blocks = pks / ROWS;
#pragma omp parallel num_threads(threads) if (!failed)
    {
        tile_config saved;
        _tile_storeconfig(&saved); /* another library's tiles in this thread: given back below */
        configure_tiles();
        uint16_t *tmp = aligned_alloc(64, (size_t)(ROWS * dp) * sizeof(uint16_t));
        scratch w = {
            aligned_alloc(64, (size_t)(ROWS * dp) * sizeof(uint16_t)),
            aligned_alloc(64, (size_t)(ROWS * CHUNK) * sizeof(float)),
            aligned_alloc(64, (size_t)(ROWS * CHUNK) * sizeof(uint16_t)),
            aligned_alloc(64, (size_t)(ROWS * dp) * sizeof(float)),
            aligned_alloc(64, (size_t)(ROWS * dp) * sizeof(float)),
            aligned_alloc(64, 3 * ROWS * sizeof(float)),
        };
        int mine_failed = !tmp || !w.q || !w.s || !w.p || !w.o || !w.part || !w.row;
        if (mine_failed) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < kv_heads * key_blocks; t++) {
                int64_t g = t / key_blocks, b = t % key_blocks, s = 0;
                while (s + 1 < segments && pk0[s + 1] <= b * ROWS) s++;
                int64_t first = b * ROWS - pk0[s], count = k_lens[s] - first;
                if (count > ROWS) count = ROWS;
                uint16_t *kdst = kp + (g * pks + b * ROWS) * dp;
                uint16_t *vdst = vp + (g * pks + b * ROWS) * dp;
                const int64_t *index = key_index ? key_index + k0[s] : NULL;
                int64_t at = key_index ? first : k0[s] + first;
                gather_rows((const uint16_t *)k + g * k_head, k_row, index, at, count, head_dim,
                            dp, tmp);
                pack_keys(tmp, dp, kdst);
                gather_rows((const uint16_t *)v + g * v_head, v_row, index, at, count, head_dim,
                            dp, tmp);
                pack_values(tmp, dp, vdst);
            }
            /* Tasks with most keys first (the last query rows of a causal segment). */
#pragma omp for schedule(dynamic, 1)
            for (int64_t t = 0; t < tasks * heads; t++) {
                int64_t h = t % heads, u = tasks - 1 - t / heads, s = 0;
                while (task0[s + 1] <= u) s++;
                int64_t g = h / pr.group;
                attend_task(&pr, &w, h, q0[s], q_lens[s], k_lens[s], (u - task0[s]) * ROWS,
                            kp + (g * pks + pk0[s]) * dp, vp + (g * pks + pk0[s]) * dp);
            }
        }
        free(tmp), free(w.q), free(w.s), free(w.p), free(w.o), free(w.part), free(w.row);
        if (saved.palette_id)
            _tile_loadconfig(&saved);
        else
            _tile_release();
    }
    free(q0), free(kp), free(vp);
    return failed ? 2 : 0;
#endif
}
