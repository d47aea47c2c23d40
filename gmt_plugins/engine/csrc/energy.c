/* The gradient's energy as the apply passes see it (gmt_apply, gmt_apply_tracked,
 * gmt_apply_preselected, gmt_apply_mask_bits): the sum of g^2 over the finite entries of a block,
 * and over those of them the apply masks, each added to a double accumulator (energy_t).
 *
 * An apply first writes its block's hits (0/1 bytes, the block being at most 4096 entries and in L1
 * cache), then the block's energy is taken here from the values before they are zeroed, then the
 * block is masked: the gradient is read from memory once (gmt_apply's fp32 blocks without ties do
 * all three in one AVX2 pass, apply_f32_block_avx2 in apply.c, with the same lanes). Each entry's square is exact in double
 * (fp32, bf16 and fp16 values carry at most 24 significant bits; fp64 squares round once); the
 * squares go to 16 lanes (entry j of a block to lane j % 16), so that the sums vectorise without
 * reassociating anything, and each block's lanes are added up in one fixed order: a given tensor and
 * cut give the same sums on every run. fp32 and bf16 blocks take a hand-written AVX2 loop where the
 * CPU has it (cpu_features.c); the portable loop is its twin, bit for bit (the tests run both).
 * Non-finite entries (never masked) count in neither sum. The torch twin is
 * gmt_plugins/engine/reference.py apply_cut. */

typedef struct {
    double all;    /* sum of g^2 over the finite entries */
    double masked; /* sum of g^2 over the masked entries (always finite) */
} energy_t;

/* What kind of number a source's gradient holds, for its energy */
enum { VALUE_F32 = 0, VALUE_BF16 = 1, VALUE_F16 = 2, VALUE_F64 = 3 };

static inline int32_t energy_value_kind(const source_t *src) {
    switch (src->kind) {
    case KIND_BF16_WIDE: return VALUE_BF16;
    case KIND_16: case KIND_RANDOM_16: return (src->flags & SOURCE_FP16) ? VALUE_F16 : VALUE_BF16;
    case KIND_RANDOM_64: return VALUE_F64;
    default: return VALUE_F32;
    }
}

/* fp16 bits -> fp32 bits, exact (subnormals normalised; inf and NaN keep an all-ones exponent) */
static inline uint32_t energy_half_bits(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
    if (exponent == 0x1Fu) return sign | 0x7F800000u | (mantissa << 13);
    if (exponent != 0) return sign | ((exponent + 112u) << 23) | (mantissa << 13);
    if (mantissa == 0) return sign;
    uint32_t e = 113u, m = mantissa; /* subnormal: shift the leading 1 to the implicit bit */
    while (!(m & 0x400u)) { m <<= 1; e -= 1; }
    return sign | (e << 23) | ((m & 0x3FFu) << 13);
}

/* Entry i of x as a double, 0.0 where it is not finite */
static inline double energy_value(const void *x, int32_t value, int64_t i) {
    if (value == VALUE_F64) {
        uint64_t bits;
        double v;
        memcpy(&bits, (const uint64_t *)x + i, 8);
        memcpy(&v, &bits, 8);
        return (bits & 0x7FF0000000000000ull) == 0x7FF0000000000000ull ? 0.0 : v;
    }
    uint32_t bits;
    if (value == VALUE_F32) bits = ((const uint32_t *)x)[i];
    else if (value == VALUE_BF16) bits = (uint32_t)((const uint16_t *)x)[i] << 16;
    else bits = energy_half_bits(((const uint16_t *)x)[i]);
    float f;
    memcpy(&f, &bits, 4);
    return (bits & 0x7F800000u) == 0x7F800000u ? 0.0 : (double)f;
}

#define ENERGY_LANES 16

/* the lanes added pairwise, in one order */
static inline double energy_lanes_sum(const double *lane) {
    double half[8];
    for (int l = 0; l < 8; ++l) half[l] = lane[l] + lane[l + 8];
    return ((half[0] + half[4]) + (half[1] + half[5])) + ((half[2] + half[6]) + (half[3] + half[7]));
}

/* The entries from `from` on, one at a time into their lanes (the portable loop, and the tails) */
static inline void energy_scalar(const void *x, int32_t value, const uint8_t *hit, int64_t from, int64_t n, double *all,
                                 double *masked) {
    for (int64_t j = from; j < n; ++j) {
        const double v = energy_value(x, value, j), square = v * v;
        all[j & (ENERGY_LANES - 1)] += square;
        masked[j & (ENERGY_LANES - 1)] += hit[j] ? square : 0.0;
    }
}

#if GMT_HAVE_AVX2_SCAN
/* Eight fp32 values (as bits) in v, with their hits (0/1 bytes) at hit: squared once in double
 * (lanes 0..3 widened from the low half), added to all, and-ed with the hits widened to 64-bit masks
 * and added to masked. FILTER: non-finite values are zeroed as bits (+0.0) first; without it a
 * non-finite value makes its lane of all non-finite (masked entries are always finite). */
#define ENERGY_ADD8_AVX2(v, hit, all, masked, FILTER)                                                \
    {                                                                                               \
        __m256i bits = (v);                                                                         \
        if (FILTER) bits = _mm256_andnot_si256(_mm256_cmpeq_epi32(_mm256_and_si256(bits, exponent), exponent), bits); \
        const __m256 k = _mm256_castsi256_ps(bits);                                                 \
        const __m256d k_lo = _mm256_cvtps_pd(_mm256_castps256_ps128(k)), k_hi = _mm256_cvtps_pd(_mm256_extractf128_ps(k, 1)); \
        const __m256d s_lo = _mm256_mul_pd(k_lo, k_lo), s_hi = _mm256_mul_pd(k_hi, k_hi);          \
        const __m128i h = _mm_loadl_epi64((const __m128i *)(hit));                                  \
        const __m256i t_lo = _mm256_sub_epi64(_mm256_setzero_si256(), _mm256_cvtepu8_epi64(h));     \
        const __m256i t_hi = _mm256_sub_epi64(_mm256_setzero_si256(), _mm256_cvtepu8_epi64(_mm_srli_si128(h, 4))); \
        (all)[0] = _mm256_add_pd((all)[0], s_lo);                                                   \
        (all)[1] = _mm256_add_pd((all)[1], s_hi);                                                   \
        (masked)[0] = _mm256_add_pd((masked)[0], _mm256_and_pd(s_lo, _mm256_castsi256_pd(t_lo)));  \
        (masked)[1] = _mm256_add_pd((masked)[1], _mm256_and_pd(s_hi, _mm256_castsi256_pd(t_hi)));  \
    }

__attribute__((target("avx2"))) static inline __m256i energy_load8_avx2(const void *x, int32_t value, int64_t j) {
    if (value == VALUE_F32) return _mm256_loadu_si256((const __m256i *)((const uint32_t *)x + j));
    return _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + j))), 16);
}

/* The whole groups of ENERGY_LANES fp32 or bf16 entries, lane by lane as energy_scalar adds them
 * (two groups of 8 per step: four accumulators per sum, whose additions do not wait on each other).
 * A block is first summed without the finite test; where that leaves a non-finite lane (the block
 * holds NaN or inf) it is summed again with it, which gives what the test everywhere would. Returns
 * how many entries it took. */
__attribute__((target("avx2"))) static int64_t energy_groups_avx2(const void *x, int32_t value, const uint8_t *hit, int64_t n,
                                                                   double *all, double *masked) {
    const __m256i exponent = _mm256_set1_epi32(0x7F800000);
    const int64_t groups = n & ~(int64_t)(ENERGY_LANES - 1);
    __m256d a[4], m[4];
    for (int filter = 0; filter < 2; ++filter) {
        for (int q = 0; q < 4; ++q) a[q] = m[q] = _mm256_setzero_pd();
        if (filter) {
            for (int64_t j = 0; j < groups; j += ENERGY_LANES) {
                ENERGY_ADD8_AVX2(energy_load8_avx2(x, value, j), hit + j, a, m, 1)
                ENERGY_ADD8_AVX2(energy_load8_avx2(x, value, j + 8), hit + j + 8, a + 2, m + 2, 1)
            }
        } else {
            for (int64_t j = 0; j < groups; j += ENERGY_LANES) {
                ENERGY_ADD8_AVX2(energy_load8_avx2(x, value, j), hit + j, a, m, 0)
                ENERGY_ADD8_AVX2(energy_load8_avx2(x, value, j + 8), hit + j + 8, a + 2, m + 2, 0)
            }
        }
        /* x - x is 0 for a finite lane, NaN for an infinite or NaN one */
        __m256d bad = _mm256_setzero_pd();
        for (int q = 0; q < 4; ++q) bad = _mm256_or_pd(bad, _mm256_cmp_pd(_mm256_sub_pd(a[q], a[q]), _mm256_setzero_pd(), _CMP_NEQ_UQ));
        if (_mm256_movemask_pd(bad) == 0) break;
    }
    for (int q = 0; q < 4; ++q) { _mm256_storeu_pd(all + 4 * q, a[q]); _mm256_storeu_pd(masked + 4 * q, m[q]); }
    return groups;
}
#endif

/* Adds to e the energy of the n (<= 4096) entries of x (values of `value` kind) and of those whose
 * hit byte is 1. */
static inline void energy_block(const void *x, int32_t value, const uint8_t *hit, int64_t n, energy_t *e) {
    double all[ENERGY_LANES] = {0}, masked[ENERGY_LANES] = {0};
    int64_t done = 0;
#if GMT_HAVE_AVX2_SCAN
    if (has_avx2() && (value == VALUE_F32 || value == VALUE_BF16)) done = energy_groups_avx2(x, value, hit, n, all, masked);
#endif
    energy_scalar(x, value, hit, done, n, all, masked);
    e->all += energy_lanes_sum(all);
    e->masked += energy_lanes_sum(masked);
}

/* One masked entry's square (the candidates that gmt_apply_preselected takes after its blocks) */
static inline double energy_one(const void *x, int32_t value, int64_t i) {
    const double v = energy_value(x, value, i);
    return v * v;
}

/* 64 hit bits -> 64 hit bytes (entry j at bit j) */
static inline void energy_unpack64(uint64_t w, uint8_t *set) {
    for (int j = 0; j < 8; ++j) {
        /* byte k of the product holds bit k of the byte when set (at most 0x80): adding 0x7F carries it to bit 7 */
        uint64_t spread = (((w >> (8 * j)) & 0xFFu) * 0x0101010101010101ULL) & 0x8040201008040201ULL;
        spread = ((spread + 0x7F7F7F7F7F7F7F7FULL) >> 7) & 0x0101010101010101ULL;
        memcpy(set + 8 * j, &spread, 8);
    }
}
