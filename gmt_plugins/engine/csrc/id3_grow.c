/* Fused key + histogram passes of gmt_plugins' selection engine (see gmt_plugins/native.py).
 *
 * The key of an entry is the bit pattern of |x| (sign bit cleared), widened like
 * gmt_plugins.keys.MagnitudeKeys: fp32 -> 32 bits, bf16 -> 32 bits (<< 16) or 16 bits, fp16 -> 16 bits.
 * Each function adds to hist[0..65537]: hist[0] counts keys below `base`, hist[1 + d] the keys whose
 * digit d = (key - base) >> shift is below 65536, and hist[65537] the keys above. One read of the
 * data, no allocation. The torch code in gmt_plugins/selection.py is the reference twin.
 */
#include <stdint.h>

#define BINS 65536u
#define F32_KEY(i) (x[i] & 0x7FFFFFFFu)
#define BF16_WIDE_KEY(i) ((uint32_t)(x[i] & 0x7FFFu) << 16)
#define KEY_16(i) ((uint32_t)(x[i] & 0x7FFFu))

/* Out-of-bucket keys are counted without branching on the key, a block of BLOCK keys at a time
 * (the compiler vectorises the block): below is a compare, and the bucket test on the unsigned
 * 64-bit difference (a key below base wraps far above any bin) is almost always false for every
 * key of a block, so the scalar loop that bins the block's keys rarely runs. Above is what is left. */
#define BLOCK 16
#define IN_BUCKET(key) ((((uint64_t)(key) - base) >> shift) < BINS)
#define BIN_ONE(key)                                                \
    if (IN_BUCKET(key)) {                                           \
        hist[1 + (((uint64_t)(key) - base) >> shift)] += 1;         \
        inside += 1;                                                \
    }
#define HISTOGRAM_LOOP(KEY)                                         \
    int64_t below = 0, inside = 0, i = 0;                           \
    for (; i + BLOCK <= n; i += BLOCK) {                            \
        uint32_t keys[BLOCK], below_block = 0, any = 0;             \
        for (int j = 0; j < BLOCK; ++j) {                           \
            int64_t at = i + j;                                     \
            uint32_t key = (KEY(at));                               \
            keys[j] = key;                                          \
            below_block += key < base;                              \
            any |= IN_BUCKET(key);                                  \
        }                                                           \
        below += below_block;                                       \
        if (any) {                                                  \
            for (int j = 0; j < BLOCK; ++j) {                       \
                BIN_ONE(keys[j])                                    \
            }                                                       \
        }                                                           \
    }                                                               \
    for (; i < n; ++i) {                                            \
        uint32_t key = (KEY(i));                                    \
        below += key < base;                                        \
        BIN_ONE(key)                                                \
    }                                                               \
    hist[0] += below;                                               \
    hist[BINS + 1] += n - below - inside;

/* When base is 0 every key lands in a bin (the top digit pass): no compare at all. */
#define TOP_LOOP(KEY)                                               \
    for (int64_t i = 0; i < n; ++i) {                               \
        uint32_t key = (KEY(i));                                    \
        hist[1 + (key >> shift)] += 1;                              \
    }

void gmt_hist_f32(const uint32_t *x, int64_t n, uint32_t base, uint32_t shift, int64_t *hist) {
    if (base == 0 && shift == 16) {
        TOP_LOOP(F32_KEY)
        return;
    }
    HISTOGRAM_LOOP(F32_KEY)
}

void gmt_hist_bf16_wide(const uint16_t *x, int64_t n, uint32_t base, uint32_t shift, int64_t *hist) {
    if (base == 0 && shift == 16) {
        TOP_LOOP(BF16_WIDE_KEY)
        return;
    }
    HISTOGRAM_LOOP(BF16_WIDE_KEY)
}

void gmt_hist_16(const uint16_t *x, int64_t n, uint32_t base, uint32_t shift, int64_t *hist) {
    if (base == 0 && shift == 0) {
        TOP_LOOP(KEY_16)
        return;
    }
    HISTOGRAM_LOOP(KEY_16)
}

/* Strict mode (gmt_plugins/strict.py): copy out the entries of x where mask is 1, and later write
 * them back. Branch-free: every entry is written to out[j] and j advances by mask[i], so `out` and
 * `saved` hold limit + 1 slots; j is clamped at limit, so a mask with more entries than expected can
 * not reach past the buffer (the caller compares the returned count with limit and raises). Entries
 * are moved as raw bits (2, 4 or 8 bytes), never as floats. */
#define MOVES(BITS)                                                                              \
    int64_t gmt_gather_masked_##BITS(const uint8_t *mask, const uint##BITS##_t *x,               \
                                     uint##BITS##_t *out, int64_t n, int64_t limit) {            \
        int64_t j = 0;                                                                           \
        for (int64_t i = 0; i < n; ++i) {                                                        \
            out[j < limit ? j : limit] = x[i];                                                   \
            j += mask[i];                                                                        \
        }                                                                                        \
        return j;                                                                                \
    }                                                                                            \
    int64_t gmt_scatter_masked_##BITS(const uint8_t *mask, uint##BITS##_t *x,                    \
                                      const uint##BITS##_t *saved, int64_t n, int64_t limit) {   \
        int64_t j = 0;                                                                           \
        for (int64_t i = 0; i < n; ++i) {                                                        \
            uint##BITS##_t v = saved[j < limit ? j : limit];                                     \
            x[i] = mask[i] ? v : x[i];                                                           \
            j += mask[i];                                                                        \
        }                                                                                        \
        return j;                                                                                \
    }

MOVES(16)
MOVES(32)
MOVES(64)

/* ---------------------------------------------------------------------------------------------
 * Many-tensor engine (gmt_plugins/selection.py: rank_group / apply_native).
 *
 * One call ranks a whole group (one tensor for the per-tensor scope, all of them for the global
 * scope): the top-digit histogram of every tensor, the non-finite count of each, the boundary bin,
 * and the low digit inside it, all in C with no allocation (the caller lends zeroed scratch and gets
 * it back zeroed). The same key kinds as above plus these:
 *   KIND_F32, KIND_BF16_WIDE, KIND_16: magnitude keys (MagnitudeKeys);
 *   KIND_RANDOM_{32,16,64}: RandomKeys, splitmix64(position + splitmix64(salt)) >> 33 with the
 *     excluded key 2**31 where the gradient (of 4, 2 or 8 bytes; the width says how to test it)
 *     is not finite;
 *   KIND_SCORE: ScoreKeys of a float32 score (|s|, NaN -> 0, inf -> FLT_MAX bits), excluded where
 *     the gradient (second pointer, fp32) is not finite;
 *   KIND_MASK: MaskKeys of a stored bool mask (second pointer, bytes; NULL = every entry masked) over
 *     an fp32 gradient: 0 = masked, 1 = kept, 2 = non-finite gradient (16-bit keys); the bytes flag
 *     the masked entries, or the kept ones when bit 0 of seed is set (a strategy's stored set, read
 *     without building its complement).
 * Counts go to TABLES interleaved sub-histograms (entry j of a block to table j % TABLES) for large
 * groups, so that runs of equal digits (gradients fall in a few hundred bins) do not wait on one
 * counter. Warm start: given a window of top digits [wlo, whi] (the previous step's boundary bin
 * +- 1, or where uniform random keys must fall), one read per tensor counts the keys below it and
 * copies the keys inside it to `cand`, with no histogram; when the k-th key falls inside the window
 * it is found among them, otherwise the histogram passes run. The hint never changes the result.
 * ------------------------------------------------------------------------------------------- */
#include <string.h>

/* x86-64: the entry points come in an AVX2 clone too, picked at load time (ifunc), which vectorises
 * the 64-bit hash and the key blocks; elsewhere, or with -DGMT_NO_CLONES (native.py retries with it
 * when the first build fails), one portable build. Integer work and -ffp-contract=off keep both
 * clones bit for bit equal. */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__) && !defined(GMT_NO_CLONES)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

enum { KIND_F32 = 0, KIND_BF16_WIDE = 1, KIND_16 = 2, KIND_RANDOM_32 = 3, KIND_RANDOM_16 = 4,
       KIND_RANDOM_64 = 5, KIND_SCORE = 6, KIND_MASK = 7 };
#define TABLES 4
#ifndef MANY_TABLES_FROM
#define MANY_TABLES_FROM (1 << 18)
#endif
/* Every kind's keys are at most 2**31 (random's cap) or below 2**31 (magnitudes, scores, 16-bit
 * keys), so no top digit exceeds TOP_DIGIT: scans and clears stop there. */
#define TOP_DIGIT 0x8000u
#define RANDOM_CAP (1u << 31)

static inline uint64_t mix64(uint64_t x) {
    x *= 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static inline uint32_t score_key(uint32_t s, uint32_t g) {
    uint32_t bits = s & 0x7FFFFFFFu;
    bits = bits > 0x7F800000u ? 0u : bits;              /* NaN ranks lowest */
    bits = bits == 0x7F800000u ? 0x7F7FFFFFu : bits;    /* overflow ranks highest, below the cap */
    return (g & 0x7F800000u) == 0x7F800000u ? 0x7F800000u : bits;
}

typedef struct {
    const void *x;       /* the gradient */
    const uint32_t *s;   /* KIND_SCORE: the score */
    int64_t n;
    int64_t start;       /* flat position of x[0] (random keys) */
    uint64_t seed;       /* splitmix64(salt) (random keys) */
    int32_t kind;
} source_t;

/* Per kind of key: the first pass (top-digit histogram over TABLES tables), the second pass (low
 * digit inside the boundary bin), the warm scan (counts below the window, copies of the keys in it)
 * and a clearing pass. The counting stores go to four tables in turn (entry j of a block of 16 to
 * table j % 4) so that equal digits in a row do not wait on each other. Bucket and window tests are
 * vectorised over a block, and the scalar loop behind them runs only for the rare block holding such
 * a key. RECOMPUTE: the key is cheap (a mask of the input), so the rare loop reads it again instead of
 * keeping the block's keys on the stack (twice as fast); expensive keys (the hash) are kept. */
#define KIND_PASSES(NAME, SETUP, KEY, SHIFT, RECOMPUTE)                                             \
    static inline void pass1_##NAME(const source_t *src, uint32_t *hist, int tables) {              \
        SETUP                                                                                       \
        const int64_t n = src->n;                                                                   \
        int64_t i = 0;                                                                              \
        uint32_t *h1 = hist + (tables > 1 ? BINS : 0), *h2 = hist + (tables > 1 ? 2 * BINS : 0);    \
        uint32_t *h3 = hist + (tables > 1 ? 3 * BINS : 0);                                          \
        for (; i + 16 <= n; i += 16) {                                                              \
            if (RECOMPUTE) {                                                                        \
                for (int j = 0; j < 16; j += 4) {                                                   \
                    hist[(KEY(i + j)) >> SHIFT] += 1;                                               \
                    h1[(KEY(i + j + 1)) >> SHIFT] += 1;                                             \
                    h2[(KEY(i + j + 2)) >> SHIFT] += 1;                                             \
                    h3[(KEY(i + j + 3)) >> SHIFT] += 1;                                             \
                }                                                                                   \
            } else {                                                                                \
                uint32_t k[16];                                                                     \
                for (int j = 0; j < 16; ++j) k[j] = (KEY(i + j));                                   \
                for (int j = 0; j < 16; j += 4) {                                                   \
                    hist[k[j] >> SHIFT] += 1;                                                       \
                    h1[k[j + 1] >> SHIFT] += 1;                                                     \
                    h2[k[j + 2] >> SHIFT] += 1;                                                     \
                    h3[k[j + 3] >> SHIFT] += 1;                                                     \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
        for (; i < n; ++i) hist[(KEY(i)) >> SHIFT] += 1;                                            \
    }                                                                                               \
    static void pass2_##NAME(const source_t *src, uint32_t digit, uint32_t *hist) {                 \
        SETUP                                                                                       \
        const int64_t n = src->n;                                                                   \
        int64_t i = 0;                                                                              \
        for (; i + 16 <= n; i += 16) {                                                              \
            uint32_t k[16], any = 0;                                                                \
            for (int j = 0; j < 16; ++j) {                                                          \
                k[j] = (KEY(i + j));                                                                \
                any |= (k[j] >> 16) == digit;                                                       \
            }                                                                                       \
            if (any) {                                                                              \
                for (int j = 0; j < 16; ++j) {                                                      \
                    if ((k[j] >> 16) == digit) hist[k[j] & 0xFFFFu] += 1;                           \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
        for (; i < n; ++i) {                                                                        \
            uint32_t key = (KEY(i));                                                                \
            if ((key >> 16) == digit) hist[key & 0xFFFFu] += 1;                                     \
        }                                                                                           \
    }                                                                                               \
    static void scan_##NAME(const source_t *src, uint32_t lo_key, uint32_t width, uint32_t cap,     \
                            int64_t *below, int64_t *excluded, uint32_t *cand, int64_t cand_cap,    \
                            int64_t *ncp) {                                                         \
        SETUP                                                                                       \
        const int64_t n = src->n;                                                                   \
        int64_t i = 0, nc = *ncp;                                                                   \
        int64_t b = 0, ex = 0;                                                                      \
        if (RECOMPUTE) { /* cheap keys: count 64 at a time, re-read the block that holds a candidate */ \
            for (; i + 64 <= n; i += 64) {                                                          \
                uint32_t any = 0, bb = 0, ee = 0;                                                   \
                for (int j = 0; j < 64; ++j) {                                                      \
                    uint32_t key = (KEY(i + j));                                                    \
                    bb += key < lo_key;                                                             \
                    ee += key >= cap;                                                               \
                    any |= key - lo_key < width;                                                    \
                }                                                                                   \
                b += bb;                                                                            \
                ex += ee;                                                                           \
                if (any) {                                                                          \
                    if (nc + 64 > cand_cap) { nc = cand_cap + 1; break; } /* too many: histograms */ \
                    /* branch-free: every key is stored, the count advances by the test (sampled   \
                     * windows hold a few % of the keys, so a branch per key would mispredict) */   \
                    for (int j = 0; j < 64; ++j) {                                                  \
                        uint32_t key = (KEY(i + j));                                                \
                        cand[nc] = key;                                                             \
                        nc += key - lo_key < width;                                                 \
                    }                                                                               \
                }                                                                                   \
            }                                                                                       \
            if (nc > cand_cap) { *ncp = nc; return; }                                               \
        }                                                                                           \
        for (; i + 16 <= n; i += 16) {                                                              \
            uint32_t k[16], any = 0, bb = 0, ee = 0;                                                \
            for (int j = 0; j < 16; ++j) {                                                          \
                k[j] = (KEY(i + j));                                                                \
                bb += k[j] < lo_key;                                                                \
                ee += k[j] >= cap;                                                                  \
                any |= k[j] - lo_key < width;                                                       \
            }                                                                                       \
            b += bb;                                                                                \
            ex += ee;                                                                               \
            if (any) {                                                                              \
                for (int j = 0; j < 16; ++j) {                                                      \
                    if (k[j] - lo_key < width) { if (nc < cand_cap) cand[nc] = k[j]; nc += 1; }     \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
        for (; i < n; ++i) {                                                                        \
            uint32_t key = (KEY(i));                                                                \
            b += key < lo_key;                                                                      \
            ex += key >= cap;                                                                       \
            if (key - lo_key < width) { if (nc < cand_cap) cand[nc] = key; nc += 1; }               \
        }                                                                                           \
        *below += b;                                                                                \
        *excluded = ex;                                                                             \
        *ncp = nc;                                                                                  \
    }                                                                                               \
    static void clear_##NAME(const source_t *src, uint32_t *hist) {                 \
        SETUP                                                                                       \
        for (int64_t i = 0; i < src->n; ++i) hist[(KEY(i)) >> SHIFT] = 0;                           \
    }                                                                                               \
    static void sample_##NAME(const source_t *src, int64_t i, int64_t end, uint32_t cap, uint32_t *hist, \
                              uint32_t *lo_d, uint32_t *hi_d, int64_t *excluded) {                  \
        SETUP                                                                                       \
        uint32_t lo = *lo_d, hi = *hi_d;                                                            \
        int64_t ex = 0;                                                                             \
        for (; i < end; ++i) {                                                                      \
            uint32_t key = (KEY(i));                                                                \
            hist[key >> 16] += 1;                                                                   \
            lo = (key >> 16) < lo ? (key >> 16) : lo;                                               \
            hi = (key >> 16) > hi ? (key >> 16) : hi;                                               \
            ex += key >= cap;                                                                       \
        }                                                                                           \
        *lo_d = lo; *hi_d = hi; *excluded += ex;                                                    \
    }

#define SETUP_32 const uint32_t *x = (const uint32_t *)src->x;
#define SETUP_16 const uint16_t *x = (const uint16_t *)src->x;
#define SETUP_RANDOM(T, E)                                                                          \
    const T *x = (const T *)src->x;                                                                 \
    const uint64_t p0 = (uint64_t)src->start + src->seed;                                           \
    const T e = (E);
#define SETUP_SCORE const uint32_t *x = (const uint32_t *)src->x; const uint32_t *sc = src->s;
#define KEY_F32(i) (x[i] & 0x7FFFFFFFu)
#define KEY_BF16_WIDE(i) ((uint32_t)(x[i] & 0x7FFFu) << 16)
#define KEY_16(i) ((uint32_t)(x[i] & 0x7FFFu))
#define KEY_RANDOM(i) ((x[i] & e) == e ? RANDOM_CAP : (uint32_t)(mix64(p0 + (uint64_t)(i)) >> 33))
#define KEY_SCORE(i) score_key(sc[i], x[i])
/* seed bit 0 (unused by masks otherwise): the bytes flag the kept entries, not the masked ones */
#define SETUP_MASK const uint32_t *x = (const uint32_t *)src->x; const uint8_t *mk = (const uint8_t *)src->s; \
    const uint32_t kept = (uint32_t)(src->seed & 1u); (void)kept;
#define KEY_MASK(i) ((x[i] & 0x7F800000u) == 0x7F800000u ? 2u : (mk ? (uint32_t)(mk[i] == 0) ^ kept : 0u))

KIND_PASSES(f32, SETUP_32, KEY_F32, 16, 1)
KIND_PASSES(bf16_wide, SETUP_16, KEY_BF16_WIDE, 16, 1)
KIND_PASSES(k16, SETUP_16, KEY_16, 0, 1)
KIND_PASSES(random32, SETUP_RANDOM(uint32_t, 0x7F800000u), KEY_RANDOM, 16, 0)
/* s != NULL marks fp16 (exponent 0x7C00) among the 16-bit random kinds, else bf16 (0x7F80) */
KIND_PASSES(random16, SETUP_RANDOM(uint16_t, src->s ? 0x7C00u : 0x7F80u), KEY_RANDOM, 16, 0)
KIND_PASSES(random64, SETUP_RANDOM(uint64_t, 0x7FF0000000000000ull), KEY_RANDOM, 16, 0)
KIND_PASSES(score, SETUP_SCORE, KEY_SCORE, 16, 1)
KIND_PASSES(mask, SETUP_MASK, KEY_MASK, 0, 1)

#define DISPATCH(src, CALL)                                                                         \
    switch ((src)->kind) {                                                                          \
    case KIND_F32: CALL(f32); break;                                                                \
    case KIND_BF16_WIDE: CALL(bf16_wide); break;                                                    \
    case KIND_16: CALL(k16); break;                                                                 \
    case KIND_RANDOM_32: CALL(random32); break;                                                     \
    case KIND_RANDOM_16: CALL(random16); break;                                                     \
    case KIND_RANDOM_64: CALL(random64); break;                                                     \
    case KIND_SCORE: CALL(score); break;                                                            \
    case KIND_MASK: CALL(mask); break;                                                              \
    }

/* Rank a group. key_bits is 16 or 32; cap the excluded-key bound (a multiple of 2**(key_bits-16)).
 * k < 0: k = (int64)(ratio * rankable), else min(k, rankable). window: [wlo, whi] top digits, or
 * wlo > whi for none. hist: TABLES * 65536 zeroed uint32 (returned zeroed); cand: cand_cap uint32.
 * nonfinite[t] receives each tensor's excluded count. out: threshold (-1 = mask nothing), ties,
 * rankable, boundary top digit (-1 if none), 1 if the second pass ran. Counts stay below 2**32
 * per table: the caller routes groups of 2**32 entries or more elsewhere. */
static inline __attribute__((always_inline)) void rank_histograms(const source_t *src, int64_t count, uint32_t key_bits,
                            uint32_t cap, double ratio, int64_t k, uint32_t *hist, int64_t *nonfinite, int64_t *out);

/* The window scan of fp32 magnitude keys with AVX2 (x86-64 with GCC or clang): eight keys per step,
 * the in-window ones packed to the front of the vector by a permutation looked up from the compare's
 * bitmask and stored to cand at once. Branch-free whatever the window's width, so a sampled window
 * of a few % of the keys costs about one read of them. scan_f32 is its portable twin (the tests run
 * both: GMT_PLUGINS_NO_AVX2_SCAN=1 in the environment at load time selects the portable one). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(GMT_NO_CLONES)
#define GMT_HAVE_AVX2_SCAN 1
#include <immintrin.h>
#include <stdlib.h>

static uint32_t compress_lut[256][8];
static int avx2_state = 0;

/* Once, when the library loads (before any thread can call in): the permutation table, and whether
 * the CPU has AVX2 and the environment allows the AVX2 scan. */
__attribute__((constructor)) static void init_avx2_scan(void) {
    const char *off = getenv("GMT_PLUGINS_NO_AVX2_SCAN");
    __builtin_cpu_init();
    for (int mask = 0; mask < 256; ++mask) {
        int at = 0;
        for (int lane = 0; lane < 8; ++lane)
            if (mask & (1 << lane)) compress_lut[mask][at++] = (uint32_t)lane;
        for (; at < 8; ++at) compress_lut[mask][at] = 0;
    }
    avx2_state = (off == NULL || off[0] == '\0' || off[0] == '0') && __builtin_cpu_supports("avx2");
}

static inline int has_avx2(void) { return avx2_state; }

__attribute__((target("avx2,popcnt"))) static void scan_f32_avx2(const uint32_t *x, int64_t n, uint32_t lo_key, uint32_t width,
                                                          uint32_t cap, int64_t *below, int64_t *excluded, uint32_t *cand,
                                                          int64_t cand_cap, int64_t *ncp) {
    /* keys are below 2**31 and lo_key + width <= cap <= 2**31 - 1: signed compares are exact */
    const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF), lo = _mm256_set1_epi32((int32_t)lo_key);
    const __m256i hi = _mm256_set1_epi32((int32_t)(lo_key + width)), top = _mm256_set1_epi32((int32_t)cap - 1);
    int64_t nc = *ncp, i = 0, b = 0, ex = 0;
    while (i + 8 <= n) {
        /* counts in 32-bit lanes: flush them every 2**20 blocks, far below overflow */
        __m256i below_acc = _mm256_setzero_si256(), excluded_acc = _mm256_setzero_si256();
        int64_t end = n - i > ((int64_t)8 << 20) ? i + ((int64_t)8 << 20) : n;
        if (nc + (end - i) > cand_cap) end = i + ((cand_cap - nc) & ~(int64_t)7);  /* never past cand */
        if (end - i < 8) { *ncp = cand_cap + 1; return; }  /* the window holds too many keys */
        for (; i + 8 <= end; i += 8) {
            __m256i key = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + i)), magnitude);
            __m256i under = _mm256_cmpgt_epi32(lo, key);          /* key < lo_key */
            __m256i above = _mm256_cmpgt_epi32(key, top);         /* key >= cap */
            __m256i inside = _mm256_andnot_si256(under, _mm256_cmpgt_epi32(hi, key));
            below_acc = _mm256_sub_epi32(below_acc, under);
            excluded_acc = _mm256_sub_epi32(excluded_acc, above);
            int mask = _mm256_movemask_ps(_mm256_castsi256_ps(inside));
            __m256i order = _mm256_loadu_si256((const __m256i *)compress_lut[mask]);
            _mm256_storeu_si256((__m256i *)(cand + nc), _mm256_permutevar8x32_epi32(key, order));
            nc += __builtin_popcount((unsigned)mask);
        }
        uint32_t lanes[8];
        _mm256_storeu_si256((__m256i *)lanes, below_acc);
        for (int j = 0; j < 8; ++j) b += lanes[j];
        _mm256_storeu_si256((__m256i *)lanes, excluded_acc);
        for (int j = 0; j < 8; ++j) ex += lanes[j];
    }
    for (; i < n; ++i) {
        uint32_t key = x[i] & 0x7FFFFFFFu;
        b += key < lo_key;
        ex += key >= cap;
        if (key - lo_key < width) { if (nc < cand_cap) cand[nc] = key; nc += 1; }
    }
    *below += b;
    *excluded = ex;
    *ncp = nc;
}
#else
#define GMT_HAVE_AVX2_SCAN 0
#endif

static inline int scan_vectorised(void) {
#if GMT_HAVE_AVX2_SCAN
    return has_avx2();
#else
    return 0;
#endif
}

/* For the tests: 1 when fp32 windows are scanned with AVX2 (and sampled). */
int32_t gmt_avx2_scan(void) { return scan_vectorised(); }

/* Warm path: one vectorised read per tensor counts the keys below the window and the excluded ones
 * and copies the window's keys to cand, with no histogram at all; when the k-th key falls inside the
 * window it is found among the candidates (returns 1). Otherwise (returns 0) the caller runs the
 * histogram passes: the result is the same, only slower. */
static inline __attribute__((always_inline)) int rank_window(const source_t *src, int64_t count, uint32_t cap, double ratio, int64_t k,
                       int64_t wlo, int64_t whi, uint32_t *hist, uint32_t *cand, int64_t cand_cap,
                       int64_t *nonfinite, int64_t *out) {
    uint64_t lo64 = (uint64_t)wlo << 16, hi64 = (uint64_t)(whi + 1) << 16;
    if (hi64 > cap) hi64 = cap;
    if (lo64 >= hi64) return 0;
    uint32_t lo_key = (uint32_t)lo64, width = (uint32_t)(hi64 - lo64);
    int64_t below = 0, total = 0, excluded_all = 0, nc = 0;
    for (int64_t t = 0; t < count; ++t) {
        const source_t *s = &src[t];
        int64_t excluded = 0;
#define SCAN(NAME) scan_##NAME(s, lo_key, width, cap, &below, &excluded, cand, cand_cap, &nc)
#if GMT_HAVE_AVX2_SCAN
        if (s->kind == KIND_F32 && cap <= 0x7FFFFFFFu && has_avx2())  /* signed lanes: keys and cap below 2**31 */
            scan_f32_avx2((const uint32_t *)s->x, s->n, lo_key, width, cap, &below, &excluded, cand, cand_cap, &nc);
        else
#endif
        DISPATCH(s, SCAN)
#undef SCAN
        if (nc > cand_cap) return 0;  /* the window held more keys than cand: the histograms decide */
        nonfinite[t] = excluded;
        excluded_all += excluded;
        total += s->n;
    }
    int64_t rankable = total - excluded_all;
    int64_t want = k < 0 ? (int64_t)(ratio * (double)rankable) : (k < rankable ? k : rankable);
    out[0] = -1; out[1] = 0; out[2] = rankable; out[3] = -1; out[4] = 0;
    if (want <= 0) return 1;
    if (want <= below || want > below + nc) return 0;
    /* the (want - below)-th smallest candidate: its top digit from a count of the candidates' top
     * digits, then its low digit from a histogram of the low digits of that top digit's candidates */
    int64_t remaining = want - below, seen = 0;
    uint32_t top = (uint32_t)wlo, low;
    /* then the boundary digit's candidates (a few % of them) are gathered to the front of cand before
     * the low digits are counted, so the 65,536-bin histogram sees only those and is cleared by them */
    int64_t in_top = 0;
    if (whi - wlo < 256) {
        /* a narrow window (the usual case): the top digits' counts fit a small table on the stack */
        uint32_t counts[256] = {0};
        for (int64_t j = 0; j < nc; ++j) counts[(cand[j] >> 16) - (uint32_t)wlo] += 1;
        uint32_t d = 0;
        for (; d < (uint32_t)(whi - wlo); ++d) {
            if (seen + counts[d] >= remaining) break;
            seen += counts[d];
        }
        top = (uint32_t)wlo + d;
    } else {
        for (int64_t j = 0; j < nc; ++j) hist[cand[j] >> 16] += 1;
        for (; top < (uint32_t)whi; ++top) {
            if (seen + hist[top] >= remaining) break;
            seen += hist[top];
        }
        for (int64_t j = 0; j < nc; ++j) hist[cand[j] >> 16] = 0;
    }
    for (int64_t j = 0; j < nc; ++j) {  /* branch-free compaction */
        uint32_t key = cand[j];
        cand[in_top] = key;
        in_top += (key >> 16) == top;
    }
    remaining -= seen;
    /* the low digit: per-bin counts in hist and per-256-bin counts on the stack, so the walk visits
     * at most 256 + 256 bins, not 65,536 */
    uint32_t blocks[256] = {0};
    for (int64_t j = 0; j < in_top; ++j) { hist[cand[j] & 0xFFFFu] += 1; blocks[(cand[j] & 0xFFFFu) >> 8] += 1; }
    int64_t under = 0;
    uint32_t block = 0;
    for (; block < 255; ++block) {
        if (under + blocks[block] >= remaining) break;
        under += blocks[block];
    }
    for (low = block << 8; low < BINS - 1; ++low) {
        if (under + hist[low] >= remaining) break;
        under += hist[low];
    }
    int64_t in_bin = hist[low];
    for (int64_t j = 0; j < in_top; ++j) hist[cand[j] & 0xFFFFu] = 0;
    remaining -= under;
    int64_t prefix = ((int64_t)top << 16) | low;
    out[3] = top;
    if (remaining == in_bin) { out[0] = prefix + 1; out[1] = 0; }
    else { out[0] = prefix; out[1] = remaining; }
    return 1;
}

/* wlo == SAMPLE_WINDOW: the window comes from a sample of the group's keys (sample_window). */
#define SAMPLE_WINDOW (-3)
#ifndef SAMPLE_FROM
#define SAMPLE_FROM (1 << 16)
#endif
#ifndef SAMPLE_MAX
#define SAMPLE_MAX (1 << 16)
#endif
#ifndef SAMPLE_SDS
#define SAMPLE_SDS 4.5
#endif
#ifndef SAMPLE_EXTRA
#define SAMPLE_EXTRA 0
#endif
#ifndef SAMPLE_RUN
#define SAMPLE_RUN 16
#endif

static double square_root(double v) {  /* Newton's iteration: the library links no libm */
    double r = v > 1.0 ? v : 1.0;
    for (int i = 0; i < 64; ++i) r = 0.5 * (r + v / r);
    return r;
}

/* Top digits [*wlo, *whi] that hold the k-th key but for a chance of about 1e-5, from a stratified
 * sample: m keys (about 2 * total**(2/3), at most SAMPLE_MAX), one at a hashed position in each of m
 * equal strata of the group. The window runs from the sample's quantile at p - margin to the one at
 * p + margin, where the margin is SAMPLE_SDS standard deviations of a sample quantile plus two
 * keys, widened to whole digits. Returns 0 (no window) when the sample says the window's keys would
 * overflow cand. Gradients move their scale from step to step (the boundary digit of a SmolLM2
 * tensor moves by tens of digits between steps), so the previous step's boundary is no hint for
 * them; a sample is, at any step. Whatever the sample, the result is exact: a miss costs the
 * histogram passes. */
static inline __attribute__((always_inline)) int sample_window(const source_t *src, int64_t count, int64_t total, uint32_t cap,
                                                               double ratio, int64_t k, uint32_t *hist, int64_t cand_cap,
                                                               int64_t *wlo, int64_t *whi) {
    int bits = 63 - __builtin_clzll((uint64_t)total);
    int64_t m = (int64_t)1 << (2 * bits / 3 + SAMPLE_EXTRA);
    if (m > SAMPLE_MAX) m = SAMPLE_MAX;
    if (m > total) m = total;
    /* runs of SAMPLE_RUN neighbours (one cache line of fp32), one run per stratum: a sample costs
     * m / SAMPLE_RUN memory reads, not m */
    const int64_t runs = m / SAMPLE_RUN > 0 ? m / SAMPLE_RUN : 1, stride = total / runs;
    uint32_t lo_d = TOP_DIGIT, hi_d = 0;
    int64_t t = 0, offset = 0, excluded = 0;
    m = 0;
    for (int64_t r = 0; r < runs; ++r) {
        int64_t at = r * stride + (int64_t)(mix64((uint64_t)r) % (uint64_t)stride);
        while (at >= offset + src[t].n) offset += src[t++].n;
        const source_t *s = &src[t];
        const int64_t end = at - offset + SAMPLE_RUN < s->n ? at - offset + SAMPLE_RUN : s->n;
#define SAMPLE(NAME) sample_##NAME(s, at - offset, end, cap, hist, &lo_d, &hi_d, &excluded)
        DISPATCH(s, SAMPLE)
#undef SAMPLE
        m += end - (at - offset);
    }
    (void)count;
    const int64_t rankable = m - excluded;
    double p = k < 0 ? ratio : (double)k * (double)m / ((double)total * (double)(rankable > 0 ? rankable : 1));
    p = p < 0.0 ? 0.0 : p > 1.0 ? 1.0 : p;
    const double margin = SAMPLE_SDS * square_root(p * (1.0 - p) / (double)(rankable > 0 ? rankable : 1)) + 2.0 / (double)m;
    const double lo_rank = (p - margin) * (double)rankable, hi_rank = (p + margin) * (double)rankable;
    int64_t seen = 0, in_window = 0;
    *wlo = lo_rank < 1.0 ? 0 : -1;
    *whi = -1;
    for (uint32_t d = lo_d; d <= hi_d && *whi < 0; ++d) {
        seen += hist[d];
        if (*wlo < 0 && (double)seen >= lo_rank) *wlo = d;
        if ((double)seen >= hi_rank) *whi = d;
        if (*wlo >= 0) in_window += hist[d];
    }
    memset(hist + lo_d, 0, ((size_t)(hi_d - lo_d) + 1) * sizeof(uint32_t));
    if (*whi < 0 || *whi >= (int64_t)(cap >> 16)) *whi = (int64_t)(cap >> 16) - 1;  /* up to the excluded keys */
    if (rankable <= 0 || *wlo > *whi) return 0;
    /* expected candidates, with room for the sample's error (+25%) */
    return (double)in_window * (double)total / (double)m * 1.25 + 64.0 <= (double)cand_cap;
}

VECTOR_CLONES void gmt_rank_group(const source_t *src, int64_t count, uint32_t key_bits, uint32_t cap, double ratio, int64_t k,
                    int64_t wlo, int64_t whi, uint32_t *hist, uint32_t *cand, int64_t cand_cap,
                    int64_t *nonfinite, int64_t *out) {
    if (key_bits == 32 && wlo == SAMPLE_WINDOW) {
        /* only where the AVX2 scan serves every tensor: the portable scan of a sampled window (a few %
         * of the keys) is no faster than the two histogram passes */
        int64_t total = 0, vector = GMT_HAVE_AVX2_SCAN;
        for (int64_t t = 0; t < count; ++t) total += src[t].n, vector &= src[t].kind == KIND_F32;
        if (!(vector && total >= SAMPLE_FROM && scan_vectorised() &&
              sample_window(src, count, total, cap, ratio, k, hist, cand_cap, &wlo, &whi)))
            wlo = -1, whi = -2;
    }
    if (key_bits == 32 && wlo >= 0 && whi >= wlo &&
        rank_window(src, count, cap, ratio, k, wlo, whi, hist, cand, cand_cap, nonfinite, out))
        return;
    rank_histograms(src, count, key_bits, cap, ratio, k, hist, nonfinite, out);
}

static inline __attribute__((always_inline)) void rank_histograms(const source_t *src, int64_t count, uint32_t key_bits,
                            uint32_t cap, double ratio, int64_t k, uint32_t *hist, int64_t *nonfinite, int64_t *out) {
    uint32_t shift = key_bits - 16, cap_digit = cap >> shift;
    int64_t total = 0, excluded_before = 0;
    for (int64_t t = 0; t < count; ++t) total += src[t].n;
    int tables = total >= MANY_TABLES_FROM ? TABLES : 1;
    for (int64_t t = 0; t < count; ++t) {
        const source_t *s = &src[t];
#define PASS1(NAME) pass1_##NAME(s, hist, tables)
        DISPATCH(s, PASS1)
#undef PASS1
        int64_t excluded = 0;
        for (int tb = 0; tb < tables; ++tb)
            for (uint32_t d = cap_digit; d <= TOP_DIGIT; ++d) excluded += hist[((uint32_t)tb << 16) | d];
        nonfinite[t] = excluded - excluded_before;
        excluded_before = excluded;
    }
    int64_t rankable = total - excluded_before;
    int64_t want = k < 0 ? (int64_t)(ratio * (double)rankable) : (k < rankable ? k : rankable);
    out[0] = -1; out[1] = 0; out[2] = rankable; out[3] = -1; out[4] = 0;
    uint32_t digit = 0;
    int64_t below = 0, in_bin = 0;
    if (want > 0) {
        for (digit = 0; digit < cap_digit; ++digit) {
            int64_t c = 0;
            for (int tb = 0; tb < tables; ++tb) c += hist[((uint32_t)tb << 16) | digit];
            if (below + c >= want) { in_bin = c; break; }
            below += c;
        }
    }
    /* give the scratch back zeroed: by revisiting a small group's keys, else wholesale */
    if (total < 4096 && tables == 1) {
        for (int64_t t = 0; t < count; ++t) {
            const source_t *s = &src[t];
#define CLEAR(NAME) clear_##NAME(s, hist)
            DISPATCH(s, CLEAR)
#undef CLEAR
        }
    } else {
        for (int tb = 0; tb < tables; ++tb) memset(hist + ((size_t)tb << 16), 0, (TOP_DIGIT + 1) * sizeof(uint32_t));
    }
    if (want <= 0) return;
    int64_t remaining = want - below;
    out[3] = digit;
    uint64_t prefix = digit;
    if (shift) {
        out[4] = 1;
        for (int64_t t = 0; t < count; ++t) {
            const source_t *s = &src[t];
#define PASS2(NAME) pass2_##NAME(s, digit, hist)
            DISPATCH(s, PASS2)
#undef PASS2
        }
        below = 0;
        uint32_t low;
        for (low = 0; low < BINS; ++low) {
            if (below + hist[low] >= remaining) break;
            below += hist[low];
        }
        in_bin = hist[low];
        remaining -= below;
        prefix = ((uint64_t)digit << 16) | low;
        memset(hist, 0, BINS * sizeof(uint32_t));
    }
    if (remaining == in_bin) { out[0] = (int64_t)prefix + 1; out[1] = 0; }
    else { out[0] = (int64_t)prefix; out[1] = remaining; }
}

/* Zero, in place, the entries of src->x whose key is below `threshold`, then the first `ties` whose
 * key equals it (in position order); +0.0 replaces them. record (or NULL) receives the mask as
 * bytes. out: masked count, ties used, and how many masked entries were nonzero before (the
 * masked_nonzero statistic, counted before zeroing; -0.0 counts as zero, and masked entries are
 * always finite: the cut never reaches the excluded keys). While ties remain, blocks of 64 are first tested (vectorised)
 * for a key equal to the threshold, and only such blocks run the loop that spends ties; the global
 * scope's budget may wait for its ties in a late tensor, so this phase can span whole tensors. */
#define APPLY_BLOCK(i0, i1, TIES)                                                                   \
    for (int64_t j = (i0); j < (i1); ++j) {                                                         \
        uint32_t key = KEY_AT(j);                                                                   \
        int tie = TIES ? ((key == threshold) & (ties > 0)) : 0;                                     \
        int hit = (key < threshold) | tie;                                                          \
        ties -= tie;                                                                                \
        used += tie;                                                                                \
        nonzero += hit & ((y[j] & magnitude) != 0);                                                 \
        y[j] = hit ? 0 : y[j];                                                                         \
        masked += hit;                                                                              \
        if (record) record[j] = (uint8_t)hit;                                                       \
    }
#define APPLY_LOOP(T, ZERO)                                                                         \
    {                                                                                               \
        T *y = (T *)src->x;                                                                         \
        const T magnitude = (T)((T)~(T)0 >> 1); /* every bit but the sign: -0.0 counts as zero */  \
        const int64_t n = src->n;                                                                   \
        int64_t i = 0;                                                                              \
        while (i < n && ties > 0) {                                                                 \
            int64_t end = n - i > 64 ? i + 64 : n;                                                  \
            uint32_t eq = 0;                                                                        \
            for (int64_t j = i; j < end; ++j) eq |= KEY_AT(j) == threshold;                         \
            if (eq) {                                                                               \
                APPLY_BLOCK(i, end, 1)                                                              \
            } else {                                                                                \
                APPLY_BLOCK(i, end, 0)                                                              \
            }                                                                                       \
            i = end;                                                                                \
        }                                                                                           \
        /* 32-bit counts per block of 4096, added up per block: 64-bit accumulators would halve \
         * the vector lanes (the counting loops run faster than one 64-bit count did) */            \
        while (i < n) {                                                                             \
            const int64_t end = n - i > 4096 ? i + 4096 : n;                                        \
            uint32_t hits = 0, nonzero_hits = 0;                                                    \
            if (record) {                                                                           \
                for (; i < end; ++i) { uint32_t key = KEY_AT(i); uint32_t hit = key < threshold;    \
                    nonzero_hits += hit & ((y[i] & magnitude) != 0);                                \
                    y[i] = hit ? (T)ZERO : y[i]; hits += hit; record[i] = (uint8_t)hit; }           \
            } else {                                                                                \
                for (; i < end; ++i) { uint32_t key = KEY_AT(i); uint32_t hit = key < threshold;    \
                    nonzero_hits += hit & ((y[i] & magnitude) != 0);                                \
                    y[i] = hit ? (T)ZERO : y[i]; hits += hit; }                                     \
            }                                                                                       \
            masked += hits;                                                                         \
            nonzero += nonzero_hits;                                                                \
        }                                                                                           \
    }

VECTOR_CLONES void gmt_apply(const source_t *src, uint64_t threshold_in, int64_t ties, uint8_t *record, int64_t *out) {
    int64_t masked = 0, used = 0, nonzero = 0;
    /* a threshold beyond 32 bits masks every key (none is that large) */
    uint32_t threshold = threshold_in > 0xFFFFFFFFull ? 0xFFFFFFFFu : (uint32_t)threshold_in;
    if (threshold_in > 0xFFFFFFFFull) ties = 0;
    uint64_t p0 = (uint64_t)src->start + src->seed;
    switch (src->kind) {
    case KIND_F32: { const uint32_t *x = (const uint32_t *)src->x;
#define KEY_AT(i) (x[i] & 0x7FFFFFFFu)
        APPLY_LOOP(uint32_t, 0u)
#undef KEY_AT
        break; }
    case KIND_BF16_WIDE: { const uint16_t *x = (const uint16_t *)src->x;
#define KEY_AT(i) ((uint32_t)(x[i] & 0x7FFFu) << 16)
        APPLY_LOOP(uint16_t, 0u)
#undef KEY_AT
        break; }
    case KIND_16: { const uint16_t *x = (const uint16_t *)src->x;
#define KEY_AT(i) ((uint32_t)(x[i] & 0x7FFFu))
        APPLY_LOOP(uint16_t, 0u)
#undef KEY_AT
        break; }
    case KIND_RANDOM_32: { const uint32_t *x = (const uint32_t *)src->x;
#define KEY_AT(i) ((x[i] & 0x7F800000u) == 0x7F800000u ? RANDOM_CAP : (uint32_t)(mix64(p0 + (uint64_t)(i)) >> 33))
        APPLY_LOOP(uint32_t, 0u)
#undef KEY_AT
        break; }
    case KIND_RANDOM_16: { const uint16_t *x = (const uint16_t *)src->x; uint16_t e = src->s ? 0x7C00u : 0x7F80u;
#define KEY_AT(i) ((x[i] & e) == e ? RANDOM_CAP : (uint32_t)(mix64(p0 + (uint64_t)(i)) >> 33))
        APPLY_LOOP(uint16_t, 0u)
#undef KEY_AT
        break; }
    case KIND_RANDOM_64: { const uint64_t *x = (const uint64_t *)src->x;
#define KEY_AT(i) ((x[i] & 0x7FF0000000000000ull) == 0x7FF0000000000000ull ? RANDOM_CAP : (uint32_t)(mix64(p0 + (uint64_t)(i)) >> 33))
        APPLY_LOOP(uint64_t, 0u)
#undef KEY_AT
        break; }
    case KIND_SCORE: { const uint32_t *x = (const uint32_t *)src->x; const uint32_t *sc = src->s;
#define KEY_AT(i) score_key(sc[i], x[i])
        APPLY_LOOP(uint32_t, 0u)
#undef KEY_AT
        break; }
    case KIND_MASK: { SETUP_MASK
        if (mk && threshold == 1 && ties == 0) { /* the stored-mask step: masked and finite go */
            uint32_t *y = (uint32_t *)src->x;
            /* and-masks rather than selects, so that the byte and word lanes vectorise together */
            for (int64_t i = 0; i < src->n; ++i) {
                uint32_t hit = ((uint32_t)(mk[i] != 0) ^ kept) & (uint32_t)((x[i] & 0x7F800000u) != 0x7F800000u);
                nonzero += hit & (uint32_t)((y[i] & 0x7FFFFFFFu) != 0);
                y[i] &= hit - 1u;
                masked += hit;
            }
            if (record)
                for (int64_t i = 0; i < src->n; ++i)
                    record[i] = (uint8_t)(((uint32_t)(mk[i] != 0) ^ kept) & ((x[i] & 0x7F800000u) != 0x7F800000u));  /* zeroed entries stay finite */
            break;
        }
#define KEY_AT(i) KEY_MASK(i)
        APPLY_LOOP(uint32_t, 0u)
#undef KEY_AT
        break; }
    }
    out[0] = masked;
    out[1] = used;
    out[2] = nonzero;
}

/* gmt_momentum's EMA in place, as its torch twin computes it: where the gradient is finite,
 * ema = fl(fl(a * ema) + fl(b * g)) with a = (float)beta, b = (float)(1 - beta); elsewhere ema stays.
 * With first != 0 it is the first step: ema = g where finite, else +0. fp32 throughout, built with
 * -ffp-contract=off so that no product is fused into an fma (torch rounds each product). */
VECTOR_CLONES void gmt_ema_f32(float *ema, const float *g, int64_t n, float a, float b, int32_t first) {
    const uint32_t *gb = (const uint32_t *)g;
    if (first) {
        for (int64_t i = 0; i < n; ++i) ema[i] = (gb[i] & 0x7F800000u) == 0x7F800000u ? 0.0f : g[i];
        return;
    }
    for (int64_t i = 0; i < n; ++i) {
        float p = a * ema[i];
        float q = b * g[i];
        float next = p + q;
        ema[i] = (gb[i] & 0x7F800000u) == 0x7F800000u ? ema[i] : next;
    }
}

/* NaN and inf entries of an fp32 tensor (count_nonfinite's twin), in one vectorised read. */
VECTOR_CLONES int64_t gmt_count_nonfinite_f32(const uint32_t *x, int64_t n) {
    int64_t total = 0;
    for (int64_t i = 0; i < n; ++i) total += (x[i] & 0x7F800000u) == 0x7F800000u;
    return total;
}

/* ---------------------------------------------------------------------------------------------
 * Random keys hashed once (gmt_plugins/strategies/random.py, native_rank.random_rank_group and
 * apply_preselected; issue 14 part 2).
 *
 * RandomKeys are uniform, so the k-th smallest key lies, with overwhelming probability, in a narrow
 * window [lo, lo + width) known before any key is seen (native_rank._window). One read per tensor
 * hashes every entry once and records, per entry, one bit: "finite and key < lo" (bits, one uint64
 * per 64 entries, each tensor starting on a word), the finite keys inside the window with their
 * positions (cand_key, cand_pos, in position order), the excluded (non-finite) count and the count
 * of bits set. The k-th key is then selected among the candidates, and the apply pass zeroes the
 * entries whose bit is set plus the candidates the cut takes (ties in position order), without
 * hashing again (gmt_apply_preselected, which serves gmt_ema_rank's selection too). When the k-th key is not in the window (or the candidates overflow) gmt_random_rank
 * returns 0 and the caller ranks by the histogram passes (gmt_rank_group): same result, slower.
 * The keys are bit for bit those of KIND_RANDOM_* (and of RandomKeys.keys, the torch twin).
 * ------------------------------------------------------------------------------------------- */

/* mix64(p) = mix64_tail(p * GOLDEN), and (p + j) * GOLDEN = p * GOLDEN + j * GOLDEN: a block of 64
 * positions takes one multiply and a table of j * GOLDEN instead of 64 (vectorised 64-bit multiplies
 * are emulated on AVX2, so this halves the hash). The top 33 bits of mix64 are those of its tail
 * before the last xor-shift, which leaves them unchanged. */
#define GOLDEN 0x9E3779B97F4A7C15ull
static inline uint64_t mix64_tail(uint64_t x) {
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    return (x ^ (x >> 27)) * 0x94D049BB133111EBull;
}

/* 64 flags (bytes 0/1) packed into one word, bit j = flag j: one multiply per 8 flags */
static inline uint64_t pack_flags64(const uint8_t *f) {
    uint64_t w = 0;
    for (int j = 0; j < 8; ++j) {
        uint64_t v;
        memcpy(&v, f + 8 * j, 8);
        w |= ((v * 0x0102040810204080ull) >> 56) << (8 * j);
    }
    return w;
}

#define RANDOM_SCAN_BODY(T, E)                                                                      \
    {                                                                                               \
        const T *x = (const T *)s->x;                                                               \
        const T e = (T)(E);                                                                         \
        for (; i + 64 <= n; i += 64) {                                                              \
            uint8_t f[64], in[64];                                                                  \
            uint32_t k[64], bb = 0, ee = 0;                                                         \
            const uint64_t base = (p0 + (uint64_t)i) * GOLDEN;                                      \
            for (int j = 0; j < 64; ++j) {                                                          \
                uint32_t bad = (x[i + j] & e) == e;                                                 \
                uint32_t key = (uint32_t)(mix64_tail(base + golden_steps[j]) >> 33);                \
                key = bad ? RANDOM_CAP : key;                                                       \
                k[j] = key;                                                                         \
                f[j] = (uint8_t)(key < lo);                                                         \
                in[j] = (uint8_t)(key - lo < width);                                                \
                bb += key < lo;                                                                     \
                ee += bad;                                                                          \
            }                                                                                       \
            bits[i >> 6] = pack_flags64(f);                                                         \
            below += bb;                                                                            \
            excluded += ee;                                                                         \
            /* the window's keys, visited by their bits: usually none, rarely more than one */      \
            for (uint64_t win = pack_flags64(in); win; win &= win - 1) {                            \
                int j = __builtin_ctzll(win);                                                       \
                if (nc < cand_cap) { cand_key[nc] = k[j]; cand_pos[nc] = i + j; }                   \
                nc += 1;                                                                            \
            }                                                                                       \
        }                                                                                           \
        uint64_t w = 0;                                                                             \
        for (; i < n; ++i) {                                                                        \
            uint32_t bad = (x[i] & e) == e;                                                         \
            uint32_t key = bad ? RANDOM_CAP : (uint32_t)(mix64(p0 + (uint64_t)i) >> 33);            \
            w |= (uint64_t)(key < lo) << (i & 63);                                                  \
            below += key < lo;                                                                      \
            excluded += bad;                                                                        \
            if (key - lo < width) {                                                                 \
                if (nc < cand_cap) { cand_key[nc] = key; cand_pos[nc] = i; }                        \
                nc += 1;                                                                            \
            }                                                                                       \
        }                                                                                           \
        if (n & 63) bits[n >> 6] = w;                                                               \
    }

/* one tensor: adds to *below_io and *nc_io, returns its excluded count */
static inline __attribute__((always_inline)) int64_t random_scan_one(const source_t *s, uint32_t lo, uint32_t width, uint64_t *bits,
                                      uint32_t *cand_key, int64_t *cand_pos, int64_t cand_cap,
                                      int64_t *below_io, int64_t *nc_io) {
    const int64_t n = s->n;
    const uint64_t p0 = (uint64_t)s->start + s->seed;
    int64_t i = 0, below = 0, excluded = 0, nc = *nc_io;
    uint64_t golden_steps[64];
    for (int j = 0; j < 64; ++j) golden_steps[j] = (uint64_t)j * GOLDEN;
    switch (s->kind) {
    case KIND_RANDOM_32: RANDOM_SCAN_BODY(uint32_t, 0x7F800000u) break;
    case KIND_RANDOM_16: RANDOM_SCAN_BODY(uint16_t, s->s ? 0x7C00u : 0x7F80u) break;
    case KIND_RANDOM_64: RANDOM_SCAN_BODY(uint64_t, 0x7FF0000000000000ull) break;
    default: break;
    }
    *below_io += below;
    *nc_io = nc;
    return excluded;
}

/* The r-th smallest (1-based) of keys a[0..n), all in [lo, lo + width): radix passes of up to 12
 * bits over them (at most three, each a count into hist, which is lent zeroed and given back so,
 * and a scan of at most 4096 bins); no branch on the keys' order, unlike a quickselect. */
#define SELECT_BITS 12
static uint32_t kth_in_window(const uint32_t *a, int64_t n, int64_t r, uint32_t lo, uint32_t width, uint32_t *hist) {
    const int bits = width > 1 ? 32 - __builtin_clz(width - 1) : 1;
    uint32_t prefix = 0;
    for (int known = 0; known < bits;) {
        int take = bits - known < SELECT_BITS ? bits - known : SELECT_BITS;
        int shift = bits - known - take;
        uint32_t mask = (1u << take) - 1u;
        for (int64_t j = 0; j < n; ++j) {
            uint32_t v = a[j] - lo;
            /* (v >> shift) >> take, in two steps: shift + take may be 32 */
            if (((v >> shift) >> take) == prefix) hist[(v >> shift) & mask] += 1;
        }
        uint32_t bin = 0;
        int64_t under = 0;
        for (; bin < mask; ++bin) {
            if (under + hist[bin] >= r) break;
            under += hist[bin];
        }
        r -= under;
        memset(hist, 0, (size_t)(mask + 1) * sizeof(uint32_t));
        prefix = (prefix << take) | bin;
        known += take;
    }
    return lo + prefix;
}

/* Rank a group of random sources (tensor scope: one; global: all) with their keys hashed once.
 * bits: for tensor t, ceil(n_t / 64) words from word_offsets[t]. cand_key/cand_pos: cand_cap slots;
 * cand_start[t] receives where tensor t's candidates begin (cand_start[count] = their total);
 * hist: 4096 zeroed uint32 (returned zeroed). ratio/k as gmt_rank_group. out: threshold (-1 = mask nothing), ties,
 * rankable. Returns 1 when ranked, 0 when the caller must rank by histograms. */
VECTOR_CLONES int32_t gmt_random_rank(const source_t *src, int64_t count, double ratio, int64_t k, uint32_t lo, uint32_t width,
                                      uint64_t *bits, const int64_t *word_offsets, uint32_t *cand_key, int64_t *cand_pos,
                                      int64_t *cand_start, int64_t cand_cap, uint32_t *hist, int64_t *nonfinite,
                                      int64_t *out) {
    int64_t below = 0, nc = 0, total = 0, excluded_all = 0;
    for (int64_t t = 0; t < count; ++t) {
        cand_start[t] = nc < cand_cap ? nc : cand_cap;
        nonfinite[t] = random_scan_one(&src[t], lo, width, bits + word_offsets[t], cand_key, cand_pos, cand_cap, &below, &nc);
        excluded_all += nonfinite[t];
        total += src[t].n;
    }
    cand_start[count] = nc < cand_cap ? nc : cand_cap;
    int64_t rankable = total - excluded_all;
    int64_t want = k < 0 ? (int64_t)(ratio * (double)rankable) : (k < rankable ? k : rankable);
    out[0] = -1; out[1] = 0; out[2] = rankable;
    if (want <= 0) return 1;
    if (nc > cand_cap || want <= below || want > below + nc) return 0;
    int64_t remaining = want - below;
    uint32_t v = kth_in_window(cand_key, nc, remaining, lo, width, hist);
    int64_t less = 0, equal = 0;
    for (int64_t j = 0; j < nc; ++j) { less += cand_key[j] < v; equal += cand_key[j] == v; }
    remaining -= less;
    if (remaining == equal) { out[0] = (int64_t)v + 1; out[1] = 0; }
    else { out[0] = v; out[1] = remaining; }
    return 1;
}

/* Zero, in place, what a cut of gmt_random_rank takes from one of its tensors: the entries whose bit
 * is set, then the candidates (cand_key/cand_pos, nc of them, position order) below threshold and
 * the first `ties` equal to it. threshold must lie in [lo, lo + width] (the caller checks). record
 * (or NULL) receives the mask as bytes. out: masked count, ties used, and how many masked entries
 * were nonzero before (gmt_apply's masked_nonzero; -0.0 counts as zero). */
#define RANDOM_APPLY_BODY(T)                                                                        \
    {                                                                                               \
        T *y = (T *)s->x;                                                                           \
        const T magnitude = (T)((T)~(T)0 >> 1); /* every bit but the sign: -0.0 counts as zero */  \
        int64_t i = 0;                                                                              \
        for (; i + 64 <= n; i += 64) {                                                              \
            uint64_t w = bits[i >> 6];                                                              \
            uint32_t w0 = (uint32_t)w, w1 = (uint32_t)(w >> 32), nz = 0;                            \
            for (int j = 0; j < 32; ++j) {                                                          \
                uint32_t hit = (w0 >> j) & 1u;                                                      \
                nz += hit & (uint32_t)((y[i + j] & magnitude) != 0);                                \
                y[i + j] &= (T)((T)hit - 1u);                                                       \
            }                                                                                       \
            for (int j = 0; j < 32; ++j) {                                                          \
                uint32_t hit = (w1 >> j) & 1u;                                                      \
                nz += hit & (uint32_t)((y[i + 32 + j] & magnitude) != 0);                           \
                y[i + 32 + j] &= (T)((T)hit - 1u);                                                  \
            }                                                                                       \
            masked += __builtin_popcountll(w);                                                      \
            nonzero += nz;                                                                          \
        }                                                                                           \
        if (i < n) {                                                                                \
            uint64_t w = bits[i >> 6];                                                              \
            for (; i < n; ++i) {                                                                    \
                uint32_t hit = (uint32_t)((w >> (i & 63)) & 1u);                                    \
                nonzero += hit & (uint32_t)((y[i] & magnitude) != 0);                               \
                y[i] &= (T)((T)hit - 1u);                                                           \
                masked += hit;                                                                      \
            }                                                                                       \
        }                                                                                           \
        for (int64_t j = 0; j < nc; ++j) {                                                          \
            uint32_t key = cand_key[j];                                                             \
            int tie = (key == threshold) & (ties > 0);                                              \
            if ((key < threshold) | tie) {                                                          \
                nonzero += (y[cand_pos[j]] & magnitude) != 0;                                       \
                y[cand_pos[j]] = 0;                                                                 \
                masked += 1;                                                                        \
                ties -= tie;                                                                        \
                used += tie;                                                                        \
                if (record) record[cand_pos[j]] = 1;                                                \
            }                                                                                       \
        }                                                                                           \
    }

VECTOR_CLONES void gmt_apply_preselected(const source_t *s, const uint64_t *bits, const uint32_t *cand_key, const int64_t *cand_pos,
                                    int64_t nc, uint32_t threshold, int64_t ties, uint8_t *record, int64_t *out) {
    const int64_t n = s->n;
    int64_t masked = 0, used = 0, nonzero = 0;
    if (record)
        for (int64_t i = 0; i < n; ++i) record[i] = (uint8_t)((bits[i >> 6] >> (i & 63)) & 1u);
    switch (s->kind) {
    case KIND_RANDOM_32: RANDOM_APPLY_BODY(uint32_t) break;
    case KIND_RANDOM_16: RANDOM_APPLY_BODY(uint16_t) break;
    case KIND_RANDOM_64: RANDOM_APPLY_BODY(uint64_t) break;
    case KIND_SCORE: RANDOM_APPLY_BODY(uint32_t) break;   /* gmt_ema_rank's selection */
    default: break;
    }
    out[0] = masked;
    out[1] = used;
    out[2] = nonzero;
}
/* ---- end of random keys hashed once ---- */

/* ---------------------------------------------------------------------------------------------
 * gmt_momentum's EMA update fused with the first ranking pass (gmt_plugins/strategies/
 * gmt_momentum.py, native_rank.ema_rank_group; issue 14 part 2).
 *
 * Sources are KIND_SCORE: x the fp32 gradient, s the fp32 EMA, which this updates in place exactly
 * as gmt_ema_f32 does (first[t] != 0: the tensor's first step, ema = g where finite, else +0). One
 * read of gradient and EMA and one write of the EMA per tensor also count the top digit of the new
 * score key (KEY_SCORE) into the histogram tables and, given a window of top digits (the previous
 * step's boundary bin +- 1), keep the keys inside it. The rest is gmt_rank_group's: the boundary bin
 * from the tables, then its low digit from the window's keys when the boundary fell among them, else
 * from a second read (pass2_score) of the updated EMA. Same arguments and outputs as gmt_rank_group
 * (key_bits 32, cap SCORE_CAP); the hint changes only the time. The twin: gmt_ema_f32 (or the torch
 * EMA) followed by gmt_rank_group, or the torch passes, on the updated EMA.
 * ------------------------------------------------------------------------------------------- */
#define EMA_CAP 0x7F800000u
/* half-width of the sampled window in standard deviations of the sampled rank (plus two keys) */
#define EMA_SIGMAS 4.5

/* the EMA of one chunk in place (gmt_ema_f32's arithmetic); returns its non-finite gradient count */
static inline __attribute__((always_inline)) int64_t ema_chunk(float *restrict e, const float *restrict g, int64_t n, float a, float b,
                                                               int first) {
    const uint32_t *gb = (const uint32_t *)g;
    int64_t bad = 0;
    if (first) {
        for (int64_t i = 0; i < n; ++i) {
            uint32_t nonfinite = (gb[i] & 0x7F800000u) == 0x7F800000u;
            e[i] = nonfinite ? 0.0f : g[i];
            bad += nonfinite;
        }
    } else {
        for (int64_t i = 0; i < n; ++i) {
            uint32_t nonfinite = (gb[i] & 0x7F800000u) == 0x7F800000u;
            float old = e[i];
            float p = a * old;
            float q = b * g[i];
            float next = p + q;
            /* an and-or select on the bits: a float select here keeps the loop scalar */
            uint32_t ob, nb, keep = 0u - nonfinite;
            memcpy(&ob, &old, sizeof ob);
            memcpy(&nb, &next, sizeof nb);
            uint32_t r = (ob & keep) | (nb & ~keep);
            memcpy(&e[i], &r, sizeof r);
            bad += nonfinite;
        }
    }
    return bad;
}

/* One tensor, EMA_CHUNK entries at a time: the EMA update, then (from cache) the top digits of the
 * new keys of one entry of every 2**sample_shift into the tables, drawn at a varying place in its
 * stratum (a Weyl sequence: one multiply) so that no row length aliases with the stride, as every
 * 8th entry of rows whose scales vary along the row would (the tensor's last, partial stratum takes
 * its first entry). Returns the excluded (non-finite gradient) count, of every entry. */
#define EMA_CHUNK 2048
static inline __attribute__((always_inline)) int64_t ema_pass1(const source_t *src, float a, float b, int first, uint32_t *hist,
                                                               int tables, uint32_t sample_shift) {
    float *ema = (float *)(uintptr_t)src->s;
    uint32_t *h1 = hist + (tables > 1 ? BINS : 0), *h2 = hist + (tables > 1 ? 2 * BINS : 0);
    uint32_t *h3 = hist + (tables > 1 ? 3 * BINS : 0);
    const int64_t step = (int64_t)1 << sample_shift;
    int64_t excluded = 0;
    for (int64_t c = 0; c < src->n; c += EMA_CHUNK) {
        const int64_t m = src->n - c < EMA_CHUNK ? src->n - c : EMA_CHUNK;
        excluded += ema_chunk(ema + c, (const float *)src->x + c, m, a, b, first);
        const uint32_t *x = (const uint32_t *)src->x + c, *sc = (const uint32_t *)src->s + c;
        int64_t i = 0;
        if (sample_shift == 0) {
            for (; i + 4 <= m; i += 4) {
                hist[KEY_SCORE(i) >> 16] += 1;
                h1[KEY_SCORE(i + 1) >> 16] += 1;
                h2[KEY_SCORE(i + 2) >> 16] += 1;
                h3[KEY_SCORE(i + 3) >> 16] += 1;
            }
        } else {
            const uint32_t down = 32u - sample_shift, golden = 2654435769u;  /* 2**32 / phi */
            uint32_t weyl = (uint32_t)((uint64_t)c >> sample_shift) * golden;      /* stratum number * golden */
            for (; i + 4 * step <= m; i += 4 * step) {
                const int64_t i0 = i + (int64_t)(weyl >> down), i1 = i + step + (int64_t)((weyl + golden) >> down);
                const int64_t i2 = i + 2 * step + (int64_t)((weyl + 2 * golden) >> down);
                const int64_t i3 = i + 3 * step + (int64_t)((weyl + 3 * golden) >> down);
                weyl += 4 * golden;
                hist[KEY_SCORE(i0) >> 16] += 1;
                h1[KEY_SCORE(i1) >> 16] += 1;
                h2[KEY_SCORE(i2) >> 16] += 1;
                h3[KEY_SCORE(i3) >> 16] += 1;
            }
            for (; i + step <= m; i += step, weyl += golden) {
                const int64_t at = i + (int64_t)(weyl >> down);
                hist[KEY_SCORE(at) >> 16] += 1;
            }
        }
        for (; i < m; i += step) hist[KEY_SCORE(i) >> 16] += 1;
    }
    return excluded;
}

/* One tensor's second read (the EMA, and the gradient only where the tensor holds a non-finite
 * entry): bits of "key < lo", the keys in [lo, lo + width) with their positions, the count below. */
#define EMA_SCAN_BODY(KEY)                                                                          \
    for (; i + 64 <= n; i += 64) {                                                                  \
        uint8_t f[64], in[64];                                                                      \
        uint32_t bb = 0, any = 0;                                                                   \
        for (int j = 0; j < 64; ++j) { uint32_t key = KEY(i + j); f[j] = (uint8_t)(key < lo); bb += key < lo; } \
        for (int j = 0; j < 64; ++j) any |= KEY(i + j) - lo < width;                                \
        below += bb;                                                                                \
        bits[i >> 6] = pack_flags64(f);                                                             \
        if (any) {                                                                                  \
            for (int j = 0; j < 64; ++j) in[j] = (uint8_t)(KEY(i + j) - lo < width);                \
            for (uint64_t w = pack_flags64(in); w; w &= w - 1) {                                    \
                int j = __builtin_ctzll(w);                                                         \
                if (nc < cand_cap) { cand_key[nc] = KEY(i + j); cand_pos[nc] = i + j; }             \
                nc += 1;                                                                            \
            }                                                                                       \
        }                                                                                           \
    }                                                                                               \
    {                                                                                               \
        uint64_t w = 0;                                                                             \
        for (; i < n; ++i) {                                                                        \
            uint32_t key = KEY(i);                                                                  \
            w |= (uint64_t)(key < lo) << (i & 63);                                                  \
            below += key < lo;                                                                      \
            if (key - lo < width) {                                                                 \
                if (nc < cand_cap) { cand_key[nc] = key; cand_pos[nc] = i; }                        \
                nc += 1;                                                                            \
            }                                                                                       \
        }                                                                                           \
        if (n & 63) bits[n >> 6] = w;                                                               \
    }

#if GMT_HAVE_AVX2_SCAN
/* ema_scan's blocks of 64 with AVX2: the keys eight at a time (score_key's clamps as compares), the
 * block's bits and its window test straight from the compares' bitmasks; the window's keys (a few %
 * of the blocks hold one) are then taken one by one. Returns where the blocks end: EMA_SCAN_BODY's
 * tail does the rest, and EMA_SCAN_BODY alone is the portable twin (GMT_PLUGINS_NO_AVX2_SCAN=1). */
__attribute__((target("avx2,popcnt"))) static int64_t ema_scan_avx2(const uint32_t *x, const uint32_t *sc, int64_t n, int with_grad,
                                                                    uint32_t lo, uint32_t width, uint64_t *bits, uint32_t *cand_key,
                                                                    int64_t *cand_pos, int64_t cand_cap, int64_t *below_io,
                                                                    int64_t *nc_io) {
    /* keys are at most EMA_CAP < 2**31 and lo + width <= EMA_CAP: signed compares are exact */
    const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF), inf = _mm256_set1_epi32((int32_t)EMA_CAP);
    const __m256i vlo = _mm256_set1_epi32((int32_t)lo), vhi = _mm256_set1_epi32((int32_t)(lo + width));
    int64_t i = 0, below = 0, nc = *nc_io;
    for (; i + 64 <= n; i += 64) {
        uint64_t under_bits = 0, in_bits = 0;
        for (int j = 0; j < 8; ++j) {
            __m256i key = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(sc + i + 8 * j)), magnitude);
            key = _mm256_andnot_si256(_mm256_cmpgt_epi32(key, inf), key);  /* NaN ranks lowest */
            key = _mm256_add_epi32(key, _mm256_cmpeq_epi32(key, inf));     /* inf: the largest finite */
            if (with_grad) {                                                /* a non-finite gradient: the cap */
                __m256i g = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + i + 8 * j)), inf);
                key = _mm256_blendv_epi8(key, inf, _mm256_cmpeq_epi32(g, inf));
            }
            __m256i under = _mm256_cmpgt_epi32(vlo, key);
            __m256i inside = _mm256_andnot_si256(under, _mm256_cmpgt_epi32(vhi, key));
            under_bits |= (uint64_t)(uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(under)) << (8 * j);
            in_bits |= (uint64_t)(uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(inside)) << (8 * j);
        }
        bits[i >> 6] = under_bits;
        below += __builtin_popcountll(under_bits);
        for (; in_bits; in_bits &= in_bits - 1) {
            int j = __builtin_ctzll(in_bits);
            if (nc < cand_cap) { cand_key[nc] = score_key(sc[i + j], with_grad ? x[i + j] : 0u); cand_pos[nc] = i + j; }
            nc += 1;
        }
    }
    *below_io += below;
    *nc_io = nc;
    return i;
}
#endif

static inline __attribute__((always_inline)) void ema_scan(const source_t *src, int64_t excluded, uint32_t lo, uint32_t width, uint64_t *bits, uint32_t *cand_key,
                     int64_t *cand_pos, int64_t cand_cap, int64_t *below_io, int64_t *nc_io) {
    const uint32_t *x = (const uint32_t *)src->x, *sc = (const uint32_t *)src->s;
    const int64_t n = src->n;
    int64_t i = 0;
#if GMT_HAVE_AVX2_SCAN
    if (has_avx2()) i = ema_scan_avx2(x, sc, n, excluded != 0, lo, width, bits, cand_key, cand_pos, cand_cap, below_io, nc_io);
#endif
    int64_t below = 0, nc = *nc_io;
#define KEY_EMA(i) score_key(sc[i], 0u)
    if (excluded) {
        EMA_SCAN_BODY(KEY_SCORE)
    } else {
        EMA_SCAN_BODY(KEY_EMA)
    }
#undef KEY_EMA
    *below_io += below;
    *nc_io = nc;
}

/* The first digit d in [start, end) whose count, added to *cum, exceeds target (end if none);
 * *cum then holds the counts of the digits before d. Blocks of 64 digits whose sum keeps *cum at
 * or below target are skipped with one vectorised sum. */
static uint32_t digit_reaching(const uint32_t *hist, int tables, uint32_t start, uint32_t end, double target, int64_t *cum) {
    uint32_t d = start;
    while (d < end) {
        if (d + 64 <= end) {
            int64_t block = 0;
            for (int tb = 0; tb < tables; ++tb)
                for (uint32_t j = 0; j < 64; ++j) block += hist[((uint32_t)tb << 16) | (d + j)];
            if ((double)(*cum + block) <= target) { *cum += block; d += 64; continue; }
        }
        int64_t c = 0;
        for (int tb = 0; tb < tables; ++tb) c += hist[((uint32_t)tb << 16) | d];
        if ((double)(*cum + c) > target) return d;
        *cum += c;
        ++d;
    }
    return end;
}

/* sqrt without libm: a few Newton steps from above */
static double root(double v) {
    if (v <= 0) return 0;
    double r = v > 1 ? v : 1;
    for (int j = 0; j < 64; ++j) {
        double next = 0.5 * (r + v / r);
        if (next >= r) break;
        r = next;
    }
    return r;
}

/* Update the EMAs and rank the group. sample_shift 0: every key into the tables, the boundary bin
 * exact, the window that bin. Otherwise every 2**sample_shift-th key: the window is the bins holding
 * the sampled keys whose rank lies within EMA_SIGMAS standard deviations (plus two) of the k-th's
 * expected rank (outside it about once in 150,000 groups). Then the second read (ema_scan) and the k-th key selected among the window's keys, as
 * gmt_random_rank does: same buffers and outputs (out: threshold, ties, rankable, lo, hi). Returns
 * 0 when the k-th key lies outside the window (or the candidates overflow): the EMAs are updated
 * all the same, and the caller ranks them by gmt_rank_group. */
VECTOR_CLONES int32_t gmt_ema_rank(const source_t *src, int64_t count, float a, float b, const int32_t *first, double ratio,
                                   int64_t k, uint32_t sample_shift, uint32_t *hist, uint64_t *bits, const int64_t *word_offsets,
                                   uint32_t *cand_key, int64_t *cand_pos, int64_t *cand_start, int64_t cand_cap,
                                   int64_t *nonfinite, int64_t *out) {
    int64_t total = 0, excluded_all = 0, sampled = 0;
    for (int64_t t = 0; t < count; ++t) {
        total += src[t].n;
        sampled += (src[t].n + ((int64_t)1 << sample_shift) - 1) >> sample_shift;
    }
    int tables = sampled >= MANY_TABLES_FROM ? TABLES : 1;
    for (int64_t t = 0; t < count; ++t) {
        nonfinite[t] = ema_pass1(&src[t], a, b, first[t], hist, tables, sample_shift);
        excluded_all += nonfinite[t];
    }
    int64_t rankable = total - excluded_all;
    int64_t want = k < 0 ? (int64_t)(ratio * (double)rankable) : (k < rankable ? k : rankable);
    out[0] = -1; out[1] = 0; out[2] = rankable; out[3] = 0; out[4] = 0;
    const uint32_t cap_digit = EMA_CAP >> 16;
    uint32_t dlo = 0, dhi = 0;
    if (want > 0) {
        double from, to;
        if (sample_shift == 0) {
            from = (double)want - 0.5; to = (double)want - 0.5;
        } else {
            int64_t finite = sampled;  /* every excluded key is EMA_CAP, in the cap digit */
            for (int tb = 0; tb < tables; ++tb) finite -= hist[((uint32_t)tb << 16) | cap_digit];
            double q = (double)want / (double)rankable, r = q * (double)finite;
            double spread = EMA_SIGMAS * root((double)finite * q * (1.0 - q)) + 2.0;
            from = r - spread; to = r + spread;
        }
        /* dlo: the bin holding sampled rank `from` (0-based), dhi: the one holding `to` */
        int64_t cum = 0;
        uint32_t d = digit_reaching(hist, tables, 0, cap_digit, from, &cum);
        dlo = d < cap_digit ? d : cap_digit - 1;
        d = digit_reaching(hist, tables, d, cap_digit, to, &cum);
        dhi = d < cap_digit ? d : cap_digit - 1;
    }
    /* give the scratch back zeroed: by revisiting a small group's sampled keys, else wholesale */
    if (sampled < 4096 && tables == 1) {
        for (int64_t t = 0; t < count; ++t) clear_score(&src[t], hist);
    } else {
        for (int tb = 0; tb < tables; ++tb) memset(hist + ((size_t)tb << 16), 0, (TOP_DIGIT + 1) * sizeof(uint32_t));
    }
    if (want <= 0) return 1;
    uint32_t lo = dlo << 16, hi = (dhi + 1) << 16;
    if (hi > EMA_CAP) hi = EMA_CAP;
    out[3] = lo; out[4] = hi;
    int64_t below = 0, nc = 0;
    for (int64_t t = 0; t < count; ++t) {
        cand_start[t] = nc < cand_cap ? nc : cand_cap;
        ema_scan(&src[t], nonfinite[t], lo, hi - lo, bits + word_offsets[t], cand_key, cand_pos, cand_cap, &below, &nc);
    }
    cand_start[count] = nc < cand_cap ? nc : cand_cap;
    if (nc > cand_cap || want <= below || want > below + nc) return 0;
    int64_t remaining = want - below;
    uint32_t v = kth_in_window(cand_key, nc, remaining, lo, hi - lo, hist);
    int64_t less = 0, equal = 0;
    for (int64_t j = 0; j < nc; ++j) { less += cand_key[j] < v; equal += cand_key[j] == v; }
    remaining -= less;
    if (remaining == equal) { out[0] = (int64_t)v + 1; out[1] = 0; }
    else { out[0] = v; out[1] = remaining; }
    return 1;
}

/* gmt_ema_rank for many groups in one call (tensor scope: one group per tensor; global scope: one
 * group), so that a step's 272 tensors cost one call from Python and not 272, each with its own
 * buffers. Group g holds tensors [group_end[g-1], group_end[g]) (group_end[-1] = 0); a group of at
 * least sample_from entries samples every 2**sample_shift-th key (gmt_ema_rank), a smaller one counts
 * every key. Each ranked group's window keys follow the previous one's in cand_key/cand_pos
 * (cand_cap in all); cand_lo[t], cand_hi[t]: tensor t's range there. out, 6 per group: ranked (1, or
 * 0: the EMAs are updated all the same, rank them by gmt_rank_group), threshold (-1: mask nothing),
 * ties, rankable, lo, hi (the window, for gmt_apply_preselected). */
VECTOR_CLONES void gmt_ema_rank_groups(const source_t *src, float a, float b, const int32_t *first, const int64_t *group_end,
                                       int64_t ngroups, double ratio, int64_t k, int64_t sample_from, uint32_t sample_shift,
                                       uint32_t *hist, uint64_t *bits, const int64_t *word_offsets, uint32_t *cand_key,
                                       int64_t *cand_pos, int64_t *cand_lo, int64_t *cand_hi, int64_t cand_cap, int64_t *nonfinite,
                                       int64_t *out) {
    int64_t used = 0;
    for (int64_t gi = 0; gi < ngroups; ++gi) {
        const int64_t t0 = gi ? group_end[gi - 1] : 0, count = group_end[gi] - t0;
        int64_t *o = out + 6 * gi, total = 0, o5[5] = {0, 0, 0, 0, 0}, starts[count + 1];
        for (int64_t t = t0; t < t0 + count; ++t) total += src[t].n;
        memset(starts, 0, sizeof starts);  /* a group that masks nothing returns before its scan writes them */
        int32_t ranked = gmt_ema_rank(src + t0, count, a, b, first + t0, ratio, k, total >= sample_from ? sample_shift : 0u, hist,
                                      bits, word_offsets + t0, cand_key + used, cand_pos + used, starts, cand_cap - used,
                                      nonfinite + t0, o5);
        for (int64_t t = 0; t < count; ++t) { cand_lo[t0 + t] = used + starts[t]; cand_hi[t0 + t] = used + starts[t + 1]; }
        o[0] = ranked; o[1] = o5[0]; o[2] = o5[1]; o[3] = o5[2]; o[4] = o5[3]; o[5] = o5[4];
        if (ranked) used += starts[count];
    }
}
/* ---- end of gmt_momentum's fused EMA and ranking ---- */

/* =============================================================================================
 * id3 growth step (gmt_plugins/native_id3.py; everything below this line belongs to it).
 *
 * id3 adds, to the updatable set, the `k` not-yet-updatable entries with the largest score
 * |g| / (eps + |theta|)^exponent over all tensors (ties in position order, tensors in order). Its
 * torch twin is ScoreKeys(largest=True, excluded=updatable) + cut_for_count + mark in
 * gmt_plugins/strategies/id3.py; this computes the same keys in C, bit for bit:
 *   score  = |g| / D(eps + |theta|) in float32, D by exponent: 0 -> 1, 1 -> d, 2 -> d*d,
 *            3 -> (d*d)*d (what torch's pow does for those exponents; its pow(d, 0.5) is not
 *            always the correctly rounded sqrtf(d), so that exponent stays with torch);
 *   key    = 0x7F7FFFFF - bits(|score|), NaN score -> 0 bits, inf -> FLT_MAX bits;
 *   key    = 0x7F800000 (excluded) where g is not finite or the entry is already updatable.
 * The k smallest keys are chosen and written into both byte masks (updatable = 1, masked = 0).
 *
 * Two ways to the same set. Warm: given a window of top digits [wlo, whi] (around the previous
 * step's boundary), one vectorised read counts the keys below it (keeping their positions, at most
 * k of them) and keeps the keys and positions inside it; when the k-th key falls inside, the
 * threshold is found among those candidates and only the kept positions are written: one read, no
 * histogram, no second pass. Otherwise (or with no window): the radix passes of the engine (top
 * digit histogram over 4 interleaved tables, low digit inside the boundary bin) and a marking pass.
 * The window never changes the result, only the time. Masks are only written once the threshold is
 * known, so a failed warm read leaves nothing to undo.
 * ============================================================================================= */
#include <math.h>

typedef struct {
    const uint32_t *g;   /* gradient, fp32 bits */
    const float *theta;  /* parameter, fp32 */
    uint8_t *updatable;  /* bool bytes: 1 = updatable */
    uint8_t *masked;     /* bool bytes: 1 = still masked (the negation of updatable) */
    int64_t n;
} id3_source_t;

/* inlined into both clones of gmt_id3_grow: a helper left out of line would be built for the
 * portable target only */
#define ID3_INLINE static inline __attribute__((always_inline))
#define ID3_CAP 0x7F800000u
#define ID3_MAX 0x7F7FFFFFu

ID3_INLINE uint32_t id3_key(uint32_t gb, float denom, uint8_t still_masked) {
    uint32_t ab = gb & 0x7FFFFFFFu, b;
    float a, s;
    memcpy(&a, &ab, 4);
    s = a / denom;
    memcpy(&b, &s, 4);
    b &= 0x7FFFFFFFu;
    b = b > 0x7F800000u ? 0u : b;
    b = b == 0x7F800000u ? ID3_MAX : b;
    uint32_t out = ((gb & 0x7F800000u) == 0x7F800000u) | (still_masked == 0);
    return out ? ID3_CAP : ID3_MAX - b;
}

#define ID3_D0(t) ((void)(t), (void)eps, 1.0f)
#define ID3_D1(t) (eps + fabsf(t))
#define ID3_D2(t) ((eps + fabsf(t)) * (eps + fabsf(t)))
#define ID3_D3(t) (((eps + fabsf(t)) * (eps + fabsf(t))) * (eps + fabsf(t)))
#define ID3_NONFINITE(i) ((g[i] & 0x7F800000u) == 0x7F800000u)

/* Keys are computed a block at a time (vectorised: 32 entries fill the 256-bit lanes of the AVX2
 * clone, 16 leave them half used) and the rare entries a pass acts on are then found by a scalar
 * loop over the block, which runs only when the block holds one. */
#define ID3_BLOCK 32
/* one bit per entry of a block, for the entries a pass acts on */
#define ID3_BITS_T uint32_t
#define ID3_KEY(i, DENOM) id3_key(g[i], DENOM(th[i]), m[i])

#if GMT_HAVE_AVX2_SCAN
/* The warm read's blocks with AVX2 (id3_scan_* below is its portable twin, GMT_PLUGINS_NO_AVX2_SCAN=1):
 * the keys eight at a time exactly as id3_key computes them (IEEE division and products, no fma: the
 * target has none), and the bitmask of the keys below `hi` from the compares, so that only the
 * entries below or inside the window are visited one by one. Returns where the blocks end, or -1
 * when a buffer overflowed (the warm read then gives up, as the portable one does). */
__attribute__((target("avx2,popcnt"))) static int64_t id3_scan_avx2(const id3_source_t *s, float eps, int kind, uint32_t lo, uint32_t hi,
                                                                    int64_t pos0, int64_t *below_io, int64_t *list, int64_t list_cap,
                                                                    uint32_t *ck, int64_t *cp, int64_t cand_cap, int64_t *nc_io,
                                                                    int64_t *excluded_io, int64_t *nonfinite_io) {
    const uint32_t *g = s->g;
    const float *th = s->theta;
    const uint8_t *m = s->masked;
    const int64_t n = s->n;
    const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF), cap = _mm256_set1_epi32((int32_t)ID3_CAP);
    const __m256i top = _mm256_set1_epi32((int32_t)ID3_MAX), vhi = _mm256_set1_epi32((int32_t)hi), zero = _mm256_setzero_si256();
    const __m256 veps = _mm256_set1_ps(eps), one = _mm256_set1_ps(1.0f);
    int64_t i = 0, b = *below_io, c = *nc_io, ex = 0, nf = 0;
    for (; i + ID3_BLOCK <= n; i += ID3_BLOCK) {
        uint32_t k[ID3_BLOCK], hits = 0;
        for (int v = 0; v < ID3_BLOCK / 8; ++v) {
            const int64_t at = i + 8 * v;
            __m256i gb = _mm256_loadu_si256((const __m256i *)(g + at));
            __m256 t = _mm256_castsi256_ps(_mm256_and_si256(_mm256_castps_si256(_mm256_loadu_ps(th + at)), magnitude));
            __m256 d = _mm256_add_ps(veps, t), denom;
            switch (kind) {
            case 0: denom = one; break;
            case 1: denom = d; break;
            case 2: denom = _mm256_mul_ps(d, d); break;
            default: denom = _mm256_mul_ps(_mm256_mul_ps(d, d), d); break;
            }
            __m256 score = _mm256_div_ps(_mm256_castsi256_ps(_mm256_and_si256(gb, magnitude)), denom);
            __m256i bits = _mm256_and_si256(_mm256_castps_si256(score), magnitude);
            bits = _mm256_andnot_si256(_mm256_cmpgt_epi32(bits, cap), bits);  /* NaN score: 0 */
            bits = _mm256_add_epi32(bits, _mm256_cmpeq_epi32(bits, cap));     /* inf: FLT_MAX */
            __m256i key = _mm256_sub_epi32(top, bits);
            __m256i bad = _mm256_cmpeq_epi32(_mm256_and_si256(gb, cap), cap);
            __m256i done = _mm256_cmpeq_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(m + at))), zero);
            key = _mm256_blendv_epi8(key, cap, _mm256_or_si256(bad, done));
            _mm256_storeu_si256((__m256i *)(k + 8 * v), key);
            hits |= (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(vhi, key))) << (8 * v);
            ex += __builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(key, cap))));
            nf += __builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(bad)));
        }
        for (; hits; hits &= hits - 1) {
            int j = __builtin_ctz(hits);
            if (k[j] < lo) {
                if (b >= list_cap) return -1;
                list[b++] = pos0 + i + j;
            } else {
                if (c >= cand_cap) return -1;
                ck[c] = k[j]; cp[c] = pos0 + i + j; c += 1;
            }
        }
    }
    *below_io = b; *nc_io = c; *excluded_io += ex; *nonfinite_io += nf;
    return i;
}
#endif

/* the warm read's AVX2 blocks (id3_scan_avx2), where the CPU has AVX2 and the environment allows */
#if GMT_HAVE_AVX2_SCAN
#define ID3_SCAN_VECTOR(KIND)                                                                       \
    if (has_avx2()) {                                                                               \
        i = id3_scan_avx2(s, eps, KIND, lo, hi, pos0, below, list, list_cap, ck, cp, cand_cap, nc, &ex, &nf); \
        if (i < 0) return 0;                                                                        \
    }
#else
#define ID3_SCAN_VECTOR(KIND)
#endif
/* Per exponent: top-digit histogram (and non-finite count), low digit inside the boundary bin,
 * the marking pass, and the warm read. */
#define ID3_PASSES(NAME, DENOM, KIND)                                                                  \
    ID3_INLINE void id3_hist_##NAME(const id3_source_t *s, float eps, uint32_t *hist, int tables,   \
                                    int64_t *nonfinite) {                                           \
        const uint32_t *g = s->g; const float *th = s->theta; const uint8_t *m = s->masked;         \
        const int64_t n = s->n;                                                                     \
        int64_t i = 0, nf = 0;                                                                      \
        uint32_t *h1 = hist + (tables > 1 ? BINS : 0), *h2 = hist + (tables > 1 ? 2 * BINS : 0);    \
        uint32_t *h3 = hist + (tables > 1 ? 3 * BINS : 0);                                          \
        for (; i + ID3_BLOCK <= n; i += ID3_BLOCK) {                                                \
            uint32_t k[ID3_BLOCK], f = 0;                                                           \
            for (int j = 0; j < ID3_BLOCK; ++j) {                                                   \
                k[j] = ID3_KEY(i + j, DENOM);                                                              \
                f += ID3_NONFINITE(i + j);                                                          \
            }                                                                                       \
            nf += f;                                                                                \
            for (int j = 0; j < ID3_BLOCK; j += 4) {                                                \
                hist[k[j] >> 16] += 1;                                                              \
                h1[k[j + 1] >> 16] += 1;                                                            \
                h2[k[j + 2] >> 16] += 1;                                                            \
                h3[k[j + 3] >> 16] += 1;                                                            \
            }                                                                                       \
        }                                                                                           \
        for (; i < n; ++i) {                                                                        \
            hist[ID3_KEY(i, DENOM) >> 16] += 1;                                                            \
            nf += ID3_NONFINITE(i);                                                                 \
        }                                                                                           \
        *nonfinite = nf;                                                                            \
    }                                                                                               \
    ID3_INLINE void id3_low_##NAME(const id3_source_t *s, float eps, uint32_t digit, uint32_t *hist) { \
        const uint32_t *g = s->g; const float *th = s->theta; const uint8_t *m = s->masked;         \
        const int64_t n = s->n;                                                                     \
        int64_t i = 0;                                                                              \
        for (; i + ID3_BLOCK <= n; i += ID3_BLOCK) {                                                \
            uint32_t k[ID3_BLOCK];                                                                  \
            ID3_BITS_T hits = 0;                                                                    \
            for (int j = 0; j < ID3_BLOCK; ++j) {                                                   \
                k[j] = ID3_KEY(i + j, DENOM);                                                       \
                hits |= (ID3_BITS_T)((k[j] >> 16) == digit) << j;                                   \
            }                                                                                       \
            for (; hits; hits &= hits - 1) hist[k[__builtin_ctz(hits)] & 0xFFFFu] += 1;           \
        }                                                                                           \
        for (; i < n; ++i) {                                                                        \
            uint32_t key = ID3_KEY(i, DENOM);                                                              \
            if ((key >> 16) == digit) hist[key & 0xFFFFu] += 1;                                     \
        }                                                                                           \
    }                                                                                               \
    ID3_INLINE int64_t id3_mark_##NAME(const id3_source_t *s, float eps, uint32_t threshold,        \
                                       int64_t *ties) {                                             \
        const uint32_t *g = s->g; const float *th = s->theta;                                       \
        uint8_t *m = s->masked, *u = s->updatable;                                                  \
        const int64_t n = s->n;                                                                     \
        int64_t i = 0, marked = 0, t = *ties;                                                       \
        for (; i + ID3_BLOCK <= n; i += ID3_BLOCK) {                                                \
            uint32_t k[ID3_BLOCK];                                                                  \
            ID3_BITS_T hits = 0;                                                                    \
            for (int j = 0; j < ID3_BLOCK; ++j) {                                                   \
                k[j] = ID3_KEY(i + j, DENOM);                                                       \
                hits |= (ID3_BITS_T)(k[j] <= threshold) << j;                                       \
            }                                                                                       \
            for (; hits; hits &= hits - 1) {                                                        \
                int j = __builtin_ctz(hits);                                                      \
                ID3_MARK_ONE(k[j], i + j)                                                           \
            }                                                                                       \
        }                                                                                           \
        for (; i < n; ++i) {                                                                        \
            uint32_t key = ID3_KEY(i, DENOM);                                                              \
            ID3_MARK_ONE(key, i)                                                                    \
        }                                                                                           \
        *ties = t;                                                                                  \
        return marked;                                                                              \
    }                                                                                               \
    /* 0 when the window cannot hold the answer (more than k keys below it, or a buffer full) */    \
    ID3_INLINE int id3_scan_##NAME(const id3_source_t *s, float eps, uint32_t lo, uint32_t hi,      \
                                   int64_t pos0, int64_t *below, int64_t *list, int64_t list_cap,   \
                                   uint32_t *ck, int64_t *cp, int64_t cand_cap, int64_t *nc,        \
                                   int64_t *excluded, int64_t *nonfinite) {                         \
        const uint32_t *g = s->g; const float *th = s->theta; const uint8_t *m = s->masked;         \
        const int64_t n = s->n;                                                                     \
        int64_t i = 0, b, c, ex = 0, nf = 0;                                                        \
        ID3_SCAN_VECTOR(KIND)                                                                       \
        b = *below; c = *nc;                                                                        \
        for (; i + ID3_BLOCK <= n; i += ID3_BLOCK) {                                                \
            uint32_t k[ID3_BLOCK], ee = 0, ff = 0;                                                  \
            ID3_BITS_T hits = 0;                                                                    \
            for (int j = 0; j < ID3_BLOCK; ++j) {                                                   \
                k[j] = ID3_KEY(i + j, DENOM);                                                       \
                hits |= (ID3_BITS_T)(k[j] < hi) << j;                                               \
                ee += k[j] >= ID3_CAP;                                                              \
                ff += ID3_NONFINITE(i + j);                                                         \
            }                                                                                       \
            ex += ee;                                                                               \
            nf += ff;                                                                               \
            for (; hits; hits &= hits - 1) {                                                        \
                int j = __builtin_ctz(hits);                                                      \
                ID3_KEEP_ONE(k[j], i + j)                                                           \
            }                                                                                       \
        }                                                                                           \
        for (; i < n; ++i) {                                                                        \
            uint32_t key = ID3_KEY(i, DENOM);                                                              \
            ex += key >= ID3_CAP;                                                                   \
            nf += ID3_NONFINITE(i);                                                                 \
            ID3_KEEP_ONE(key, i)                                                                    \
        }                                                                                           \
        *below = b; *nc = c; *excluded = ex; *nonfinite = nf;                                       \
        return 1;                                                                                   \
    }

/* marking: below the threshold, or equal to it while ties remain (position order) */
#define ID3_MARK_ONE(KEY, AT)                                                                       \
    {                                                                                               \
        uint32_t key_ = (KEY);                                                                      \
        int hit_ = key_ < threshold;                                                                \
        if (key_ == threshold && key_ < ID3_CAP && t > 0) { hit_ = 1; t -= 1; }                     \
        if (hit_) { u[AT] = 1; m[AT] = 0; marked += 1; }                                            \
    }
/* the warm read: the position of a key below the window, the key and position of one inside */
#define ID3_KEEP_ONE(KEY, AT)                                                                       \
    {                                                                                               \
        uint32_t key_ = (KEY);                                                                      \
        if (key_ < lo) {                                                                            \
            if (b >= list_cap) return 0;                                                            \
            list[b++] = pos0 + (AT);                                                                \
        } else if (key_ < hi) {                                                                     \
            if (c >= cand_cap) return 0;                                                            \
            ck[c] = key_; cp[c] = pos0 + (AT); c += 1;                                              \
        }                                                                                           \
    }

ID3_PASSES(e0, ID3_D0, 0)
ID3_PASSES(e1, ID3_D1, 1)
ID3_PASSES(e2, ID3_D2, 2)
ID3_PASSES(e3, ID3_D3, 3)

/* exponent kinds (native_id3.EXPONENT_KINDS) */
#define ID3_DISPATCH(kind, CALL)                                                                    \
    switch (kind) {                                                                                 \
    case 0: CALL(e0); break;                                                                        \
    case 1: CALL(e1); break;                                                                        \
    case 2: CALL(e2); break;                                                                        \
    default: CALL(e3); break;                                                                       \
    }

/* Write the sorted global positions pos[0..npos) into the masks; per-tensor counts to marked. The
 * tensor's bounds and pointers live in locals: byte stores may alias the struct, which would
 * otherwise be read again for every position. */
ID3_INLINE void id3_mark_positions(const id3_source_t *src, int64_t count, const int64_t *pos, int64_t npos,
                                   int64_t *marked) {
    int64_t t = 0, offset = 0, end = count ? src[0].n : 0, added = 0;
    uint8_t *u = count ? src[0].updatable : 0, *m = count ? src[0].masked : 0;
    for (int64_t j = 0; j < npos; ++j) {
        int64_t at = pos[j];
        if (at >= end) {
            marked[t] += added;
            added = 0;
            do { offset = end; ++t; end = offset + src[t].n; } while (at >= end);
            u = src[t].updatable;
            m = src[t].masked;
        }
        u[at - offset] = 1;
        m[at - offset] = 0;
        added += 1;
    }
    if (npos) marked[t] += added;
}

/* The warm read (see the section's comment): 1 when it found and marked the answer. */
ID3_INLINE int id3_grow_window(const id3_source_t *src, int64_t count, float eps, int32_t kind, int64_t k,
                           int64_t wlo, int64_t whi, uint32_t *hist, int64_t *list, int64_t list_cap,
                           uint32_t *ck, int64_t *cp, int64_t cand_cap, int64_t *nonfinite, int64_t *marked,
                           int64_t *out) {
    uint64_t lo64 = (uint64_t)wlo << 16, hi64 = (uint64_t)(whi + 1) << 16;
    if (hi64 > ID3_CAP) hi64 = ID3_CAP;
    if (lo64 >= hi64) return 0;
    uint32_t lo = (uint32_t)lo64, hi = (uint32_t)hi64;
    if (list_cap > k) list_cap = k;
    int64_t below = 0, nc = 0, excluded_all = 0, total = 0;
    for (int64_t t = 0; t < count; ++t) {
        int64_t excluded = 0, nf = 0;
#define ID3_SCAN(NAME) if (!id3_scan_##NAME(&src[t], eps, lo, hi, total, &below, list, list_cap, ck, cp, cand_cap, &nc, &excluded, &nf)) return 0
        ID3_DISPATCH(kind, ID3_SCAN)
#undef ID3_SCAN
        nonfinite[t] = nf;
        excluded_all += excluded;
        total += src[t].n;
    }
    int64_t rankable = total - excluded_all;
    int64_t want = k < rankable ? k : rankable;
    if (want <= below || want > below + nc) return 0;
    /* the (want - below)-th smallest candidate: its top digit, then its low digit */
    int64_t remaining = want - below, seen = 0;
    for (int64_t j = 0; j < nc; ++j) hist[ck[j] >> 16] += 1;
    uint32_t top = lo >> 16;
    for (; top < (hi >> 16); ++top) {
        if (seen + hist[top] >= remaining) break;
        seen += hist[top];
    }
    for (int64_t j = 0; j < nc; ++j) hist[ck[j] >> 16] = 0;
    remaining -= seen;
    for (int64_t j = 0; j < nc; ++j) if ((ck[j] >> 16) == top) hist[ck[j] & 0xFFFFu] += 1;
    uint32_t low = 0;
    int64_t under = 0;
    for (; low < BINS; ++low) {
        if (under + hist[low] >= remaining) break;
        under += hist[low];
    }
    int64_t in_bin = hist[low];
    for (int64_t j = 0; j < nc; ++j) hist[ck[j] & 0xFFFFu] = 0;
    remaining -= under;
    uint32_t threshold = (top << 16) | low;
    int64_t ties = remaining == in_bin ? 0 : remaining;
    if (!ties) threshold += 1;
    /* below the window: every kept position; inside: below the threshold, then the first ties */
    id3_mark_positions(src, count, list, below, marked);
    int64_t kept = 0;
    for (int64_t j = 0; j < nc; ++j) {
        int take = ck[j] < threshold;
        if (ck[j] == threshold && ties > 0) { take = 1; ties -= 1; }
        if (take) cp[kept++] = cp[j];
    }
    id3_mark_positions(src, count, cp, kept, marked);
    out[0] = threshold; out[1] = remaining == in_bin ? 0 : remaining; out[2] = rankable; out[3] = top; out[4] = 1;
    out[5] = below; out[6] = nc;
    return 1;
}

/* The radix passes and a marking pass (the cold path). */
ID3_INLINE void id3_grow_histograms(const id3_source_t *src, int64_t count, float eps, int32_t kind, int64_t k,
                                uint32_t *hist, int64_t *nonfinite, int64_t *marked, int64_t *out) {
    const uint32_t cap_digit = ID3_CAP >> 16;
    int64_t total = 0;
    for (int64_t t = 0; t < count; ++t) total += src[t].n;
    int tables = total >= MANY_TABLES_FROM ? TABLES : 1;
    for (int64_t t = 0; t < count; ++t) {
#define ID3_HIST(NAME) id3_hist_##NAME(&src[t], eps, hist, tables, &nonfinite[t])
        ID3_DISPATCH(kind, ID3_HIST)
#undef ID3_HIST
    }
    int64_t excluded = 0;
    for (int tb = 0; tb < tables; ++tb) excluded += hist[((uint32_t)tb << 16) | cap_digit];
    int64_t rankable = total - excluded;
    int64_t want = k < rankable ? k : rankable;
    out[0] = -1; out[1] = 0; out[2] = rankable; out[3] = -1; out[4] = 2; out[5] = 0; out[6] = 0;
    uint32_t digit = 0;
    int64_t below = 0;
    if (want > 0) {
        for (digit = 0; digit < cap_digit; ++digit) {
            int64_t c = 0;
            for (int tb = 0; tb < tables; ++tb) c += hist[((uint32_t)tb << 16) | digit];
            if (below + c >= want) break;
            below += c;
        }
    }
    for (int tb = 0; tb < tables; ++tb) memset(hist + ((size_t)tb << 16), 0, (cap_digit + 1) * sizeof(uint32_t));
    if (want <= 0) return;
    for (int64_t t = 0; t < count; ++t) {
#define ID3_LOW(NAME) id3_low_##NAME(&src[t], eps, digit, hist)
        ID3_DISPATCH(kind, ID3_LOW)
#undef ID3_LOW
    }
    int64_t remaining = want - below, under = 0;
    uint32_t low;
    for (low = 0; low < BINS; ++low) {
        if (under + hist[low] >= remaining) break;
        under += hist[low];
    }
    int64_t in_bin = hist[low];
    memset(hist, 0, BINS * sizeof(uint32_t));
    remaining -= under;
    uint32_t threshold = (digit << 16) | low;
    int64_t ties = remaining == in_bin ? 0 : remaining;
    if (!ties) threshold += 1;
    out[0] = threshold; out[1] = ties; out[3] = digit;
    for (int64_t t = 0; t < count; ++t) {
#define ID3_MARK(NAME) marked[t] += id3_mark_##NAME(&src[t], eps, threshold, &ties)
        ID3_DISPATCH(kind, ID3_MARK)
#undef ID3_MARK
    }
}

/* One growth step. k > 0 entries wanted; window [wlo, whi] of top digits or wlo > whi for none;
 * hist: TABLES * 65536 zeroed uint32 (returned zeroed); list: list_cap int64; candidates: cand_cap
 * uint32 keys and int64 positions. nonfinite[t] and marked[t] receive each tensor's non-finite
 * gradient count and newly updatable entries. out: threshold key, ties, rankable, boundary top
 * digit (-1 if nothing was chosen), path (1 = warm read, 2 = histogram passes), and for the warm
 * read the keys below the window and the candidates inside it (0 otherwise). The caller keeps
 * the group below 2**32 entries (counts are uint32 per table). */
VECTOR_CLONES void gmt_id3_grow(const id3_source_t *src, int64_t count, float eps, int32_t kind, int64_t k,
                                int64_t wlo, int64_t whi, uint32_t *hist, int64_t *list, int64_t list_cap,
                                uint32_t *cand_key, int64_t *cand_pos, int64_t cand_cap, int64_t *nonfinite,
                                int64_t *marked, int64_t *out) {
    for (int64_t t = 0; t < count; ++t) marked[t] = 0;
    if (wlo >= 0 && whi >= wlo &&
        id3_grow_window(src, count, eps, kind, k, wlo, whi, hist, list, list_cap, cand_key, cand_pos, cand_cap,
                        nonfinite, marked, out))
        return;
    id3_grow_histograms(src, count, eps, kind, k, hist, nonfinite, marked, out);
}
/* ---- end of the id3 section ---- */

/* ---- coverage section (gmt_plugins/coverage.py) ---- */
/* Fold one step's mask of n entries into two bit sets packed eight entries to a byte (entry i is
 * bit i % 8 of byte i / 8; the bits past n stay 0): updated |= not masked, previous = masked.
 * mask: n bool bytes (0 or 1; 1 = masked), or NULL when every entry is masked (a frozen tensor).
 * first != 0: previous holds nothing yet, so no churn is counted.
 * out[0]: set bits of updated afterwards; out[1]: entries whose masked state changed. */
static inline uint8_t coverage_pack8(const uint8_t *mask, int64_t count) {
    uint8_t packed = 0;
    for (int64_t j = 0; j < count; ++j) packed |= (uint8_t)((mask[j] != 0) << j);
    return packed;
}

static inline uint8_t coverage_pack_word(const uint8_t *mask) {
    uint64_t w;
    memcpy(&w, mask, 8);
    /* bool bytes are 0 or 1: one multiply gathers bit 0 of byte j into bit 56 + j */
    return (uint8_t)(((w & 0x0101010101010101ULL) * 0x0102040810204080ULL) >> 56);
}

#if GMT_HAVE_AVX2_SCAN
/* The whole words of gmt_coverage_observe with AVX2 and POPCNT: a shift moves bit 0 of every mask
 * byte to bit 7, and one movemask packs 32 bytes to 32 bits; the portable loop below is its twin
 * (GMT_PLUGINS_NO_AVX2_SCAN=1 selects it, and the tests run both). */
__attribute__((target("avx2,popcnt"))) static void coverage_words_avx2(const uint8_t *mask, int64_t words, uint8_t *updated,
                                                                        uint8_t *previous, int64_t *set, int64_t *changed) {
    int64_t s = 0, c = 0;
    for (int64_t q = 0; q < words; ++q) {
        uint64_t packed = ~0ULL, up, prev;
        if (mask != NULL) {
            const __m256i a = _mm256_loadu_si256((const __m256i *)(mask + 64 * q));
            const __m256i b = _mm256_loadu_si256((const __m256i *)(mask + 64 * q + 32));
            const uint32_t lo = (uint32_t)_mm256_movemask_epi8(_mm256_slli_epi64(a, 7));
            const uint32_t hi = (uint32_t)_mm256_movemask_epi8(_mm256_slli_epi64(b, 7));
            packed = (uint64_t)lo | ((uint64_t)hi << 32);
        }
        memcpy(&up, updated + 8 * q, 8);
        memcpy(&prev, previous + 8 * q, 8);
        up |= ~packed;
        memcpy(updated + 8 * q, &up, 8);
        memcpy(previous + 8 * q, &packed, 8);
        s += __builtin_popcountll(up);
        c += __builtin_popcountll(prev ^ packed);
    }
    *set += s;
    *changed += c;
}
#endif

void gmt_coverage_observe(const uint8_t *mask, int64_t n, uint8_t *updated, uint8_t *previous, int32_t first,
                          int64_t *out) {
    int64_t set = 0, changed = 0;
    const int64_t bytes = (n + 7) / 8, words = n / 64;
#if GMT_HAVE_AVX2_SCAN
    if (has_avx2()) {
        coverage_words_avx2(mask, words, updated, previous, &set, &changed);
    } else
#endif
    for (int64_t q = 0; q < words; ++q) { /* 64 entries: 8 packed bytes at a time */
        uint64_t packed = ~0ULL, up, prev;
        if (mask != NULL) {
            packed = 0;
            for (int j = 0; j < 8; ++j) packed |= (uint64_t)coverage_pack_word(mask + 64 * q + 8 * j) << (8 * j);
        }
        memcpy(&up, updated + 8 * q, 8);
        memcpy(&prev, previous + 8 * q, 8);
        up |= ~packed;
        memcpy(updated + 8 * q, &up, 8);
        memcpy(previous + 8 * q, &packed, 8);
        set += __builtin_popcountll(up);
        changed += __builtin_popcountll(prev ^ packed);
    }
    for (int64_t b = 8 * words; b < bytes; ++b) { /* the last (up to 63) entries, a byte at a time */
        const int64_t count = n - 8 * b < 8 ? n - 8 * b : 8;
        const uint8_t valid = count == 8 ? 0xFF : (uint8_t)((1u << count) - 1u);
        uint8_t packed = valid;
        if (mask != NULL) packed = count == 8 ? coverage_pack_word(mask + 8 * b) : coverage_pack8(mask + 8 * b, count);
        const uint8_t u = (uint8_t)(updated[b] | (~packed & valid));
        updated[b] = u;
        set += __builtin_popcount(u);
        changed += __builtin_popcount((uint8_t)(previous[b] ^ packed));
        previous[b] = packed;
    }
    out[0] = set;
    out[1] = first ? 0 : changed;
}

/* gmt_apply of a magnitude-key tensor (KIND_F32, KIND_BF16_WIDE, KIND_16) with coverage folded in as
 * it goes: blocks of TRACK_BLOCK entries are masked by gmt_apply with a record on the stack, and each
 * block's record is folded into the bit sets by gmt_coverage_observe at once, so the step's mask
 * never exists as one byte per entry of the tensor (written, then read back from memory). The
 * result is the two calls' over the whole tensor (ties are spent block after block, in position
 * order; TRACK_BLOCK is a multiple of 64, so each block starts a packed word). out: masked, ties
 * used, masked nonzero, set bits of updated, changed (0 when first). Returns 0 (did nothing) for
 * another kind of key. */
#define TRACK_BLOCK 8192
int32_t gmt_apply_tracked(const source_t *src, uint64_t threshold, int64_t ties, uint8_t *updated, uint8_t *previous,
                          int32_t first, int64_t *out) {
    size_t width;
    switch (src->kind) {
    case KIND_F32: width = 4; break;
    case KIND_BF16_WIDE: case KIND_16: width = 2; break;
    default: return 0;
    }
    uint8_t record[TRACK_BLOCK];
    int64_t masked = 0, used = 0, nonzero = 0, set = 0, changed = 0, part_out[3], fold_out[2];
    source_t part = *src;
    for (int64_t i = 0; i < src->n; i += TRACK_BLOCK) {
        part.x = (const char *)src->x + (size_t)i * width;
        part.n = src->n - i < TRACK_BLOCK ? src->n - i : TRACK_BLOCK;
        gmt_apply(&part, threshold, ties, record, part_out);
        masked += part_out[0];
        used += part_out[1];
        ties -= part_out[1];
        nonzero += part_out[2];
        gmt_coverage_observe(record, part.n, updated + i / 8, previous + i / 8, first, fold_out);
        set += fold_out[0];
        changed += fold_out[1];
    }
    out[0] = masked; out[1] = used; out[2] = nonzero; out[3] = set; out[4] = first ? 0 : changed;
    return 1;
}
/* ---- end of the coverage section ---- */

/* ---- stored-mask section (strategies/_masks.py StoredMask; spiel, sift, spt accumulation) ---- */
/* Accumulate the finite entries of an fp32 gradient into an fp32 sum, in place: v = g where g is
 * finite, else +0; v = v * v when square != 0; acc = v when first != 0, else acc = acc + v. Each
 * operation rounds as its torch twin's does (nan_to_num, square_, add_; -ffp-contract=off keeps
 * acc + v * v unfused): one read of g and one read and write of acc, no scratch tensor. */
#define ACCUMULATE_LOOP(VALUE, STORE)                                                               \
    for (int64_t i = 0; i < n; ++i) {                                                               \
        const float v = (gb[i] & 0x7F800000u) == 0x7F800000u ? 0.0f : g[i];                        \
        const float w = (VALUE);                                                                    \
        acc[i] = (STORE);                                                                           \
    }
VECTOR_CLONES void gmt_accumulate_finite_f32(float *restrict acc, const float *restrict g, int64_t n, int32_t first,
                                             int32_t square) {
    const uint32_t *gb = (const uint32_t *)g;
    if (first && square) { ACCUMULATE_LOOP(v * v, w) }
    else if (first) { ACCUMULATE_LOOP(v, w) }
    else if (square) { ACCUMULATE_LOOP(v * v, acc[i] + w) }
    else { ACCUMULATE_LOOP(v, acc[i] + w) }
}
#undef ACCUMULATE_LOOP

/* Pack n bool bytes into bits, entry i at bit i % 64 of word i / 64 (the bits past n are 0); with
 * invert != 0 a byte that is 0 sets its bit (a stored set of kept entries -> bits of masked ones). */
static inline uint64_t stored_pack8(const uint8_t *bytes) {
    uint64_t w;
    memcpy(&w, bytes, 8);
    /* bool bytes are 0 or 1: one multiply gathers bit 0 of byte j into bit 56 + j */
    return ((w & 0x0101010101010101ULL) * 0x0102040810204080ULL) >> 56;
}

void gmt_pack_mask_bits(const uint8_t *mask, int64_t n, int32_t invert, uint64_t *bits) {
    const int64_t words = n / 64;
    const uint64_t flip = invert ? ~0ULL : 0ULL;
    for (int64_t q = 0; q < words; ++q) {
        uint64_t packed = 0;
        for (int j = 0; j < 8; ++j) packed |= stored_pack8(mask + 64 * q + 8 * j) << (8 * j);
        bits[q] = packed ^ flip;
    }
    if (words * 64 < n) {
        uint64_t packed = 0;
        for (int64_t i = words * 64; i < n; ++i) packed |= (uint64_t)((mask[i] != 0) ^ (invert != 0)) << (i - words * 64);
        bits[words] = packed;
    }
}

/* The stored-mask step (MaskKeys' Cut(1)) from packed bits: zero, in place, the finite fp32 entries
 * whose bit is set, as gmt_apply does for KIND_MASK at threshold 1 with no ties; out: masked, 0 ties,
 * masked_nonzero (-0.0 counts as zero); record (or NULL) receives the zeroed entries as bytes. A word
 * with no bit set leaves its 64 entries unread. */
static inline void stored_unpack(uint64_t w, uint8_t *set) {
    for (int j = 0; j < 8; ++j) {
        /* byte k of the product holds bit k of the byte when set (at most 0x80): adding 0x7F carries it to bit 7 */
        uint64_t spread = (((w >> (8 * j)) & 0xFFu) * 0x0101010101010101ULL) & 0x8040201008040201ULL;
        spread = ((spread + 0x7F7F7F7F7F7F7F7FULL) >> 7) & 0x0101010101010101ULL;
        memcpy(set + 8 * j, &spread, 8);
    }
}

#define STORED_BLOCK 4096
VECTOR_CLONES void gmt_apply_mask_bits(uint32_t *restrict y, const uint64_t *restrict bits, int64_t n,
                                       uint8_t *restrict record, int64_t *out) {
    int64_t masked = 0, nonzero = 0;
    uint8_t set[STORED_BLOCK];
    for (int64_t base = 0; base < n; base += STORED_BLOCK) {
        const int64_t count = n - base < STORED_BLOCK ? n - base : STORED_BLOCK;
        const int64_t words = (count + 63) / 64;
        uint64_t any = 0;
        for (int64_t q = 0; q < words; ++q) {
            const uint64_t w = bits[base / 64 + q];
            any |= w;
            stored_unpack(w, set + 64 * q);
        }
        if (any == 0) { /* nothing masked here: the block is not read */
            if (record) memset(record + base, 0, (size_t)count);
            continue;
        }
        uint32_t hits = 0, nonzero_hits = 0;
        uint32_t *restrict z = y + base;
        for (int64_t j = 0; j < count; ++j) {
            const uint32_t hit = (uint32_t)set[j] & (uint32_t)((z[j] & 0x7F800000u) != 0x7F800000u);
            nonzero_hits += hit & (uint32_t)((z[j] & 0x7FFFFFFFu) != 0);
            z[j] &= hit - 1u;
            hits += hit;
        }
        if (record) /* zeroed entries stay finite, so the test reads the same after the write */
            for (int64_t j = 0; j < count; ++j)
                record[base + j] = (uint8_t)((uint32_t)set[j] & (uint32_t)((z[j] & 0x7F800000u) != 0x7F800000u));
        masked += hits;
        nonzero += nonzero_hits;
    }
    out[0] = masked;
    out[1] = 0;
    out[2] = nonzero;
}
#undef STORED_BLOCK
/* The keys of ScoreKeys(largest, excluded) over float32 scores, written out as float32 scores that
 * rank smallest first with nothing excluded (strategies/_sparse.py key_scores, reference_key_scores
 * its torch twin): bits of |s|, or 0x7F7FFFFF minus them with largest; +inf (the excluded key) where
 * s is not finite or excluded[i] (bytes, or NULL) is set. */
VECTOR_CLONES void gmt_score_keys_f32(const uint32_t *restrict s, const uint8_t *restrict excluded, int64_t n,
                                      int32_t largest, uint32_t *restrict out) {
    const uint32_t flip = largest ? 0x7F7FFFFFu : 0u;
    for (int64_t i = 0; i < n; ++i) {
        const uint32_t bits = s[i] & 0x7FFFFFFFu;
        const uint32_t key = largest ? flip - bits : bits;
        const int rankable = (bits < 0x7F800000u) & (excluded ? excluded[i] == 0 : 1);
        out[i] = rankable ? key : 0x7F800000u;
    }
}
/* ---- end of the stored-mask section ---- */
