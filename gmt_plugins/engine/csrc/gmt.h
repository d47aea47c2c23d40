/* What the kernels of gmt_plugins' selection engine share: the kinds of key, how each is computed
 * from a tensor's bits, the source a group member is described by, and the build switches.
 *
 * The sources are one translation unit: gmt_kernels.c includes this header and then every file of
 * this folder, in an order where each file may use the static helpers of the files before it. The
 * loader (gmt_plugins/engine/cpu/loader.py) compiles gmt_kernels.c into one shared library;
 * gmt_plugins/engine/cpu/signatures.py lists its exported functions and their ctypes signatures.
 *
 * Keys. Every kernel ranks entries by an unsigned integer key computed from the tensor's bits,
 * bit for bit the key its torch twin in gmt_plugins/keys.py computes:
 *   KIND_F32, KIND_BF16_WIDE, KIND_16: MagnitudeKeys, the bit pattern of |x| (sign bit cleared),
 *     fp32 -> 32 bits, bf16 -> 32 bits (<< 16) or 16 bits, fp16 -> 16 bits;
 *   KIND_RANDOM_{32,16,64}: RandomKeys, splitmix64(position + splitmix64(salt)) >> 33 with the
 *     excluded key 2**31 where the gradient (of 4, 2 or 8 bytes; the width says how to test it)
 *     is not finite;
 *   KIND_SCORE: ScoreKeys of a float32 score (|s|, NaN -> 0, inf -> FLT_MAX bits), excluded where
 *     the gradient (second pointer, fp32) is not finite;
 *   KIND_MASK: MaskKeys of a stored bool mask (second pointer, bytes; NULL = every entry masked) over
 *     an fp32 gradient: 0 = masked, 1 = kept, 2 = non-finite gradient (16-bit keys); the bytes flag
 *     the masked entries, or the kept ones with SOURCE_KEPT (a strategy's stored set, read without
 *     building its complement).
 * source_t.flags: SOURCE_FP16 says 16-bit values (KIND_16, KIND_RANDOM_16) are fp16, not bf16;
 * SOURCE_KEPT says KIND_MASK bytes flag the kept entries.
 */
#ifndef GMT_H
#define GMT_H

#include <stdint.h>
#include <string.h>

/* x86-64: the entry points come in an AVX2 clone too, picked at load time (ifunc), which vectorises
 * the 64-bit hash and the key blocks; elsewhere, or with -DGMT_NO_CLONES (the loader's portable
 * build, for a compiler that rejects the clones), one portable build. Integer work and
 * -ffp-contract=off keep both clones bit for bit equal. */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__) && !defined(GMT_NO_CLONES)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

/* The hand-written AVX2 scans (x86-64 with GCC or clang), each beside its portable twin; which runs
 * is decided once at load (cpu_features.c). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(GMT_NO_CLONES)
#define GMT_HAVE_AVX2_SCAN 1
#include <immintrin.h>
#include <stdlib.h>
#else
#define GMT_HAVE_AVX2_SCAN 0
#endif

#define BINS 65536u

enum { KIND_F32 = 0, KIND_BF16_WIDE = 1, KIND_16 = 2, KIND_RANDOM_32 = 3, KIND_RANDOM_16 = 4,
       KIND_RANDOM_64 = 5, KIND_SCORE = 6, KIND_MASK = 7 };
/* Counts go to TABLES interleaved sub-histograms (entry j of a block to table j % TABLES) for groups
 * of at least MANY_TABLES_FROM entries, so that runs of equal digits (gradients fall in a few hundred
 * bins) do not wait on one counter. */
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

/* One member of a group (ctypes: gmt_plugins/engine/cpu/signatures.py, Source). */
typedef struct {
    const void *x;       /* the gradient */
    const uint32_t *s;   /* KIND_SCORE: the score; KIND_MASK: the mask bytes; else unused */
    int64_t n;
    int64_t start;       /* flat position of x[0] (random keys) */
    uint64_t seed;       /* splitmix64(salt) (random keys) */
    int32_t kind;
    uint32_t flags;      /* SOURCE_FP16, SOURCE_KEPT */
} source_t;

enum { SOURCE_FP16 = 1u, SOURCE_KEPT = 2u };

/* SETUP_<kind> declares what KEY_<kind>(i) reads from `src`; KEY_<kind>(i) is entry i's key. */
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
/* kept: the bytes flag the kept entries, not the masked ones */
#define SETUP_MASK const uint32_t *x = (const uint32_t *)src->x; const uint8_t *mk = (const uint8_t *)src->s; \
    const uint32_t kept = (src->flags & SOURCE_KEPT) ? 1u : 0u; (void)kept;
#define KEY_MASK(i) ((x[i] & 0x7F800000u) == 0x7F800000u ? 2u : (mk ? (uint32_t)(mk[i] == 0) ^ kept : 0u))

#endif
