/* The sums of g^2 behind the opt-in statistic energy_kept (GMTConfig.track_energy): the apply entry
 * points that take an `energy` pointer (gmt_apply_energy, gmt_apply_tracked, gmt_apply_preselected,
 * gmt_apply_mask_bits) add to energy[0] the sum of g^2 over the finite entries before masking and to
 * energy[1] the same sum after it (the energy kept). They mask block by block (at most ENERGY_BLOCK
 * entries) and sum each block just before and just after masking it, while it is in L1 cache, so the
 * gradient is still read from memory once. A NULL `energy` skips the sums: those entry points then run
 * as they do without the statistic. A tensor a cut leaves whole is read once, by gmt_square_sum.
 *
 * Each entry's square is exact in double (fp32, bf16 and fp16 values carry at most 24 significant
 * bits; an fp64 square rounds once). Squares go to ENERGY_LANES lanes (entry j of a block to lane
 * j % ENERGY_LANES), which vectorise without reassociating anything, and the lanes are added up in one
 * fixed order: a tensor and a cut give the same sums on every run and in both clones. NaN and inf
 * count as 0. The torch twin is the energy argument of gmt_plugins/engine/reference.py apply_cut. */

/* What a source's gradient holds, for its energy */
enum { VALUE_F32 = 0, VALUE_BF16 = 1, VALUE_F16 = 2, VALUE_F64 = 3 };

static inline int32_t energy_value_kind(const source_t *src) {
    switch (src->kind) {
    case KIND_BF16_WIDE: return VALUE_BF16;
    case KIND_16: case KIND_RANDOM_16: return (src->flags & SOURCE_FP16) ? VALUE_F16 : VALUE_BF16;
    case KIND_RANDOM_64: return VALUE_F64;
    default: return VALUE_F32; /* fp32 magnitudes and random keys, scores' and stored masks' gradients */
    }
}

static inline size_t energy_value_width(int32_t value) {
    return value == VALUE_F64 ? 8 : (value == VALUE_F32 ? 4 : 2);
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

/* fp32 bits as a double, 0.0 where not finite */
static inline double energy_f32(uint32_t bits) {
    float f;
    memcpy(&f, &bits, 4);
    return (bits & 0x7F800000u) == 0x7F800000u ? 0.0 : (double)f;
}

static inline double energy_f64(uint64_t bits) {
    double v;
    memcpy(&v, &bits, 8);
    return (bits & 0x7FF0000000000000ull) == 0x7FF0000000000000ull ? 0.0 : v;
}

#define ENERGY_LANES 16
#define ENERGY_BLOCK 4096 /* entries masked between the two sums: 16 KB of fp32, in L1 cache */

/* The lanes added pairwise, in one order */
static inline double energy_lanes_sum(const double *lane) {
    double half[8];
    for (int l = 0; l < 8; ++l) half[l] = lane[l] + lane[l + 8];
    return ((half[0] + half[4]) + (half[1] + half[5])) + ((half[2] + half[6]) + (half[3] + half[7]));
}

/* Whole groups of ENERGY_LANES entries (an inner loop the compiler unrolls into vector lanes), then the tail */
#define ENERGY_LOOP(T, VALUE)                                                                       \
    {                                                                                               \
        const T *v = (const T *)x;                                                                  \
        int64_t j = 0;                                                                              \
        for (; j + ENERGY_LANES <= n; j += ENERGY_LANES)                                            \
            for (int l = 0; l < ENERGY_LANES; ++l) {                                                \
                const double d = VALUE(v[j + l]);                                                   \
                lane[l] += d * d;                                                                   \
            }                                                                                       \
        for (int l = 0; j < n; ++j, ++l) {                                                          \
            const double d = VALUE(v[j]);                                                           \
            lane[l] += d * d;                                                                       \
        }                                                                                           \
    }
#define ENERGY_BF16(b) energy_f32((uint32_t)(b) << 16)
#define ENERGY_F16(b) energy_f32(energy_half_bits(b))

#if GMT_HAVE_AVX2_SCAN
/* Eight fp32 values (as bits): non-finite ones zeroed, widened to double (lanes 0..3 from the low
 * half), squared and added to acc[0] and acc[1] */
#define ENERGY_ADD8_AVX2(bits, acc)                                                                 \
    {                                                                                               \
        const __m256i b8 = (bits);                                                                  \
        const __m256 k = _mm256_castsi256_ps(_mm256_andnot_si256(_mm256_cmpeq_epi32(_mm256_and_si256(b8, exponent), exponent), b8)); \
        const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(k)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(k, 1)); \
        (acc)[0] = _mm256_add_pd((acc)[0], _mm256_mul_pd(lo, lo));                                  \
        (acc)[1] = _mm256_add_pd((acc)[1], _mm256_mul_pd(hi, hi));                                  \
    }

/* The whole groups of ENERGY_LANES fp32 or bf16 entries into lane[] exactly as ENERGY_LOOP adds them
 * (acc[q] holds lanes 4q..4q+3; a multiply, then an add, per entry); returns how many entries it took. */
__attribute__((target("avx2"))) static int64_t energy_groups_avx2(const void *x, int32_t value, int64_t n, double *lane) {
    const __m256i exponent = _mm256_set1_epi32(0x7F800000);
    const int64_t groups = n & ~(int64_t)(ENERGY_LANES - 1);
    __m256d acc[4];
    for (int q = 0; q < 4; ++q) acc[q] = _mm256_setzero_pd();
    if (value == VALUE_F32) {
        const uint32_t *v = (const uint32_t *)x;
        for (int64_t j = 0; j < groups; j += ENERGY_LANES) {
            ENERGY_ADD8_AVX2(_mm256_loadu_si256((const __m256i *)(v + j)), acc)
            ENERGY_ADD8_AVX2(_mm256_loadu_si256((const __m256i *)(v + j + 8)), acc + 2)
        }
    } else { /* bf16: the fp32 with the same upper half */
        const uint16_t *v = (const uint16_t *)x;
        for (int64_t j = 0; j < groups; j += ENERGY_LANES) {
            ENERGY_ADD8_AVX2(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(v + j))), 16), acc)
            ENERGY_ADD8_AVX2(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(v + j + 8))), 16), acc + 2)
        }
    }
    for (int q = 0; q < 4; ++q) _mm256_storeu_pd(lane + 4 * q, acc[q]);
    return groups;
}
#undef ENERGY_ADD8_AVX2
#endif

/* The sum of g^2 over the finite entries of x[0..n) (values of kind `value`). fp32 and bf16 take a
 * hand-written AVX2 loop where the CPU has it (cpu_features.c); the portable loop is its twin, bit
 * for bit (the tests run both). */
static inline double energy_sum(const void *x, int32_t value, int64_t n) {
    double lane[ENERGY_LANES] = {0};
#if GMT_HAVE_AVX2_SCAN
    if (has_avx2() && (value == VALUE_F32 || value == VALUE_BF16)) {
        const int64_t done = energy_groups_avx2(x, value, n, lane);
        const size_t width = value == VALUE_F32 ? 4 : 2;
        x = (const char *)x + (size_t)done * width;
        n -= done; /* the tail: done is a multiple of ENERGY_LANES, so entry j of it goes to lane j */
    }
#endif
    switch (value) {
    case VALUE_F32: ENERGY_LOOP(uint32_t, energy_f32) break;
    case VALUE_BF16: ENERGY_LOOP(uint16_t, ENERGY_BF16) break;
    case VALUE_F16: ENERGY_LOOP(uint16_t, ENERGY_F16) break;
    default: ENERGY_LOOP(uint64_t, energy_f64) break;
    }
    return energy_lanes_sum(lane);
}
#undef ENERGY_LOOP
#undef ENERGY_BF16
#undef ENERGY_F16

/* The sum of g^2 over the finite entries of a tensor a cut leaves whole (nothing to mask, so one
 * read); value: VALUE_F32, VALUE_BF16, VALUE_F16 or VALUE_F64. */
VECTOR_CLONES double gmt_square_sum(const void *x, int64_t n, int32_t value) {
    double total = 0.0;
    for (int64_t i = 0; i < n; i += ENERGY_BLOCK) {
        const int64_t count = n - i < ENERGY_BLOCK ? n - i : ENERGY_BLOCK;
        total += energy_sum((const char *)x + (size_t)i * energy_value_width(value), value, count);
    }
    return total;
}

/* Entries i0..i0+n of src as a source of their own (the gradient, the second pointer of scores and
 * stored masks, and the flat position of random keys moved along) */
static inline source_t source_part(const source_t *src, int64_t i0, int64_t n) {
    source_t part = *src;
    part.x = (const char *)src->x + (size_t)i0 * energy_value_width(energy_value_kind(src));
    if (src->s != NULL && src->kind == KIND_SCORE) part.s = src->s + i0;
    if (src->s != NULL && src->kind == KIND_MASK) part.s = (const uint32_t *)((const uint8_t *)src->s + i0);
    part.start = src->start + i0;
    part.n = n;
    return part;
}
