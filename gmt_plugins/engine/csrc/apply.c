/* Masking one tensor (native_rank.apply): gmt_apply applies a cut of gmt_rank_group (or of the
 * per-pass engine) to one member of the group, computing each entry's key again as it goes.
 *
 * Zero, in place, the entries of src->x whose key is below `threshold`, then the first `ties` whose
 * key equals it (in position order); +0.0 replaces them. record (or NULL) receives the mask as
 * bytes. out: masked count, ties used, and how many masked entries were nonzero before (the
 * masked_nonzero statistic, counted before zeroing; -0.0 counts as zero, and masked entries are
 * always finite: the cut never reaches the excluded keys). energy[0] and energy[1] are added the
 * sums of g^2 over the finite entries and over the masked ones (energy.c), taken before zeroing:
 * each block's hits are written first (to the stack), then its energy is taken, then it is masked.
 * While ties remain, blocks of 64 are first tested (vectorised) for a key equal to the threshold,
 * and only such blocks run the loop that spends ties (the others are masked as the main phase is);
 * the global scope's budget may wait for its ties in a late tensor, so this phase can span whole
 * tensors. */
#define APPLY_BLOCK 4096 /* entries whose hits are held at once (on the stack, in L1 cache) */
/* The hits of entries i0..i1 to hb (spending ties in position order with TIES) */
#define APPLY_HITS(i0, i1, TIES)                                                                    \
    for (int64_t j = (i0); j < (i1); ++j) {                                                         \
        uint32_t key = KEY_AT(j);                                                                   \
        int tie = TIES ? ((key == threshold) & (ties > 0)) : 0;                                     \
        hb[j - (i0)] = (uint8_t)((key < threshold) | tie);                                          \
        ties -= tie;                                                                                \
        used += tie;                                                                                \
    }
/* The energy of entries i0..i1 (energy.c), then zero the hits; 32-bit counts per block, added up per
 * block: 64-bit accumulators would halve the vector lanes */
#define APPLY_ZERO(T, i0, i1)                                                                       \
    {                                                                                               \
        energy_block(y + (i0), value, hb, (i1) - (i0), &energy_sums);                               \
        uint32_t hits = 0, nonzero_hits = 0;                                                        \
        for (int64_t j = (i0); j < (i1); ++j) {                                                     \
            uint32_t hit = hb[j - (i0)];                                                            \
            nonzero_hits += hit & ((y[j] & magnitude) != 0);                                        \
            y[j] = hit ? (T)0 : y[j];                                                               \
            hits += hit;                                                                            \
        }                                                                                           \
        if (record) memcpy(record + (i0), hb, (size_t)((i1) - (i0)));                               \
        masked += hits;                                                                             \
        nonzero += nonzero_hits;                                                                    \
    }
#if GMT_HAVE_AVX2_SCAN
/* One block of KIND_F32 without ties (threshold below 2**31) in one AVX2 pass: the keys, the hits,
 * the counts, the zeroing, the record and the energy of every group of 16 entries while they are in
 * registers; the last (up to 15) entries one at a time. It gives, bit for bit, what APPLY_HITS and
 * APPLY_ZERO give (the energy in the lanes of energy_scalar; the tests run both). */
__attribute__((target("avx2"))) static void apply_f32_block_avx2(uint32_t *y, int64_t count, uint32_t threshold, uint8_t *record,
                                                                   int64_t *masked, int64_t *nonzero, energy_t *e) {
    const __m256i thr = _mm256_set1_epi32((int32_t)threshold), cap = _mm256_set1_epi32(0x7F800000);
    const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF), none = _mm256_setzero_si256();
    __m256d a[4], m[4];
    for (int q = 0; q < 4; ++q) a[q] = m[q] = _mm256_setzero_pd();
    __m256i hits = none, nonzero_hits = none;
    const int64_t groups = count & ~(int64_t)(ENERGY_LANES - 1);
    for (int64_t j = 0; j < groups; j += ENERGY_LANES) {
        for (int g = 0; g < 2; ++g) {
            uint32_t *p = y + j + 8 * g;
            const __m256i v = _mm256_loadu_si256((const __m256i *)p);
            const __m256i key = _mm256_and_si256(v, magnitude);
            const __m256i hit = _mm256_cmpgt_epi32(thr, key); /* keys are below 2**31: a signed compare */
            hits = _mm256_sub_epi32(hits, hit);
            nonzero_hits = _mm256_sub_epi32(nonzero_hits, _mm256_andnot_si256(_mm256_cmpeq_epi32(key, none), hit));
            _mm256_storeu_si256((__m256i *)p, _mm256_andnot_si256(hit, v));
            if (record) {
                const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(hit), _mm256_extracti128_si256(hit, 1));
                _mm_storel_epi64((__m128i *)(record + j + 8 * g), _mm_and_si128(_mm_packs_epi16(words, words), _mm_set1_epi8(1)));
            }
            const __m256 k = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_cmpgt_epi32(cap, key))); /* finite values */
            const __m256d k_lo = _mm256_cvtps_pd(_mm256_castps256_ps128(k)), k_hi = _mm256_cvtps_pd(_mm256_extractf128_ps(k, 1));
            const __m256d s_lo = _mm256_mul_pd(k_lo, k_lo), s_hi = _mm256_mul_pd(k_hi, k_hi);
            const __m256d t_lo = _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(hit)));
            const __m256d t_hi = _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_extracti128_si256(hit, 1)));
            a[2 * g] = _mm256_add_pd(a[2 * g], s_lo);
            a[2 * g + 1] = _mm256_add_pd(a[2 * g + 1], s_hi);
            m[2 * g] = _mm256_add_pd(m[2 * g], _mm256_and_pd(s_lo, t_lo));
            m[2 * g + 1] = _mm256_add_pd(m[2 * g + 1], _mm256_and_pd(s_hi, t_hi));
        }
    }
    double all[ENERGY_LANES], taken[ENERGY_LANES];
    for (int q = 0; q < 4; ++q) { _mm256_storeu_pd(all + 4 * q, a[q]); _mm256_storeu_pd(taken + 4 * q, m[q]); }
    uint32_t lane_hits[8], lane_nonzero[8];
    _mm256_storeu_si256((__m256i *)lane_hits, hits);
    _mm256_storeu_si256((__m256i *)lane_nonzero, nonzero_hits);
    int64_t block_hits = 0, block_nonzero = 0;
    for (int l = 0; l < 8; ++l) { block_hits += lane_hits[l]; block_nonzero += lane_nonzero[l]; }
    for (int64_t j = groups; j < count; ++j) {
        const uint32_t key = y[j] & 0x7FFFFFFFu, hit = key < threshold;
        const double v = energy_value(y, VALUE_F32, j), square = v * v;
        all[j & (ENERGY_LANES - 1)] += square;
        taken[j & (ENERGY_LANES - 1)] += hit ? square : 0.0;
        block_hits += hit;
        block_nonzero += hit & (key != 0);
        y[j] = hit ? 0u : y[j];
        if (record) record[j] = (uint8_t)hit;
    }
    e->all += energy_lanes_sum(all);
    e->masked += energy_lanes_sum(taken);
    *masked += block_hits;
    *nonzero += block_nonzero;
}
#define APPLY_FAST_F32(threshold) (has_avx2() && (threshold) <= 0x7FFFFFFFu)
#else
#define APPLY_FAST_F32(threshold) 0
static inline void apply_f32_block_avx2(uint32_t *y, int64_t count, uint32_t threshold, uint8_t *record, int64_t *masked,
                                        int64_t *nonzero, energy_t *e) { /* never called without the AVX2 scans */
    (void)y; (void)count; (void)threshold; (void)record; (void)masked; (void)nonzero; (void)e;
}
#endif

/* Entries from..to, which hold no tie to spend, block by block (FAST: apply_f32_block_avx2) */
#define APPLY_RUN(T, FAST, from, to)                                                                \
    while (i < (to)) {                                                                              \
        const int64_t end = (to) - i > APPLY_BLOCK ? i + APPLY_BLOCK : (to);                        \
        if (FAST) {                                                                                 \
            apply_f32_block_avx2((uint32_t *)(y + i), end - i, threshold, record ? record + i : NULL, \
                                 &masked, &nonzero, &energy_sums);                                  \
        } else {                                                                                    \
            APPLY_HITS(i, end, 0)                                                                   \
            APPLY_ZERO(T, i, end)                                                                   \
        }                                                                                           \
        i = end;                                                                                    \
    }
/* While ties remain, the next block of 64 holding a key equal to the threshold is looked for (up to a
 * block ahead); the entries before it are masked as in the main phase, then it spends ties entry by
 * entry. */
#define APPLY_LOOP(T, FAST)                                                                         \
    {                                                                                               \
        T *y = (T *)src->x;                                                                         \
        const T magnitude = (T)((T)~(T)0 >> 1); /* every bit but the sign: -0.0 counts as zero */  \
        const int64_t n = src->n;                                                                   \
        uint8_t hb[APPLY_BLOCK];                                                                    \
        int64_t i = 0;                                                                              \
        while (i < n && ties > 0) {                                                                 \
            /* at most a block ahead, so that the entries scanned are still in cache when masked */ \
            const int64_t stop = n - i > APPLY_BLOCK ? i + APPLY_BLOCK : n;                         \
            int64_t k = i, tied_end = n;                                                            \
            int found = 0;                                                                          \
            for (; k < stop; k = tied_end) {                                                        \
                tied_end = n - k > 64 ? k + 64 : n;                                                 \
                uint32_t eq = 0;                                                                    \
                for (int64_t j = k; j < tied_end; ++j) eq |= KEY_AT(j) == threshold;                \
                if (eq) { found = 1; break; }                                                       \
            }                                                                                       \
            APPLY_RUN(T, FAST, i, k)                                                                \
            if (!found) continue;                                                                   \
            APPLY_HITS(k, tied_end, 1)                                                              \
            APPLY_ZERO(T, k, tied_end)                                                              \
            i = tied_end;                                                                           \
        }                                                                                           \
        APPLY_RUN(T, FAST, i, n)                                                                    \
    }

VECTOR_CLONES void gmt_apply(const source_t *src, uint64_t threshold_in, int64_t ties, uint8_t *record, int64_t *out,
                             double *energy) {
    int64_t masked = 0, used = 0, nonzero = 0;
    energy_t energy_sums = {0.0, 0.0};
    const int32_t value = energy_value_kind(src);
    /* a threshold beyond 32 bits masks every key (none is that large) */
    uint32_t threshold = threshold_in > 0xFFFFFFFFull ? 0xFFFFFFFFu : (uint32_t)threshold_in;
    if (threshold_in > 0xFFFFFFFFull) ties = 0;
    uint64_t p0 = (uint64_t)src->start + src->seed;
    switch (src->kind) {
    case KIND_F32: { const uint32_t *x = (const uint32_t *)src->x;
#define KEY_AT(i) (x[i] & 0x7FFFFFFFu)
        if (APPLY_FAST_F32(threshold)) APPLY_LOOP(uint32_t, 1)
        else APPLY_LOOP(uint32_t, 0)
#undef KEY_AT
        break; }
    case KIND_BF16_WIDE: { const uint16_t *x = (const uint16_t *)src->x;
#define KEY_AT(i) ((uint32_t)(x[i] & 0x7FFFu) << 16)
        APPLY_LOOP(uint16_t, 0)
#undef KEY_AT
        break; }
    case KIND_16: { const uint16_t *x = (const uint16_t *)src->x;
#define KEY_AT(i) ((uint32_t)(x[i] & 0x7FFFu))
        APPLY_LOOP(uint16_t, 0)
#undef KEY_AT
        break; }
    case KIND_RANDOM_32: { const uint32_t *x = (const uint32_t *)src->x;
#define KEY_AT(i) ((x[i] & 0x7F800000u) == 0x7F800000u ? RANDOM_CAP : (uint32_t)(mix64(p0 + (uint64_t)(i)) >> 33))
        APPLY_LOOP(uint32_t, 0)
#undef KEY_AT
        break; }
    case KIND_RANDOM_16: { const uint16_t *x = (const uint16_t *)src->x; uint16_t e = (src->flags & SOURCE_FP16) ? 0x7C00u : 0x7F80u;
#define KEY_AT(i) ((x[i] & e) == e ? RANDOM_CAP : (uint32_t)(mix64(p0 + (uint64_t)(i)) >> 33))
        APPLY_LOOP(uint16_t, 0)
#undef KEY_AT
        break; }
    case KIND_RANDOM_64: { const uint64_t *x = (const uint64_t *)src->x;
#define KEY_AT(i) ((x[i] & 0x7FF0000000000000ull) == 0x7FF0000000000000ull ? RANDOM_CAP : (uint32_t)(mix64(p0 + (uint64_t)(i)) >> 33))
        APPLY_LOOP(uint64_t, 0)
#undef KEY_AT
        break; }
    case KIND_SCORE: { const uint32_t *x = (const uint32_t *)src->x; const uint32_t *sc = src->s;
#define KEY_AT(i) score_key(sc[i], x[i])
        APPLY_LOOP(uint32_t, 0)
#undef KEY_AT
        break; }
    case KIND_MASK: { SETUP_MASK
        if (mk && threshold == 1 && ties == 0) { /* the stored-mask step: masked and finite go */
            uint32_t *y = (uint32_t *)src->x;
            uint8_t hb[APPLY_BLOCK];
            for (int64_t b = 0; b < src->n; b += APPLY_BLOCK) {
                const int64_t count = src->n - b < APPLY_BLOCK ? src->n - b : APPLY_BLOCK;
                for (int64_t j = 0; j < count; ++j)
                    hb[j] = (uint8_t)(((uint32_t)(mk[b + j] != 0) ^ kept) & (uint32_t)((x[b + j] & 0x7F800000u) != 0x7F800000u));
                energy_block(y + b, VALUE_F32, hb, count, &energy_sums);
                uint32_t hits = 0, nonzero_hits = 0;
                /* and-masks rather than selects, so that the byte and word lanes vectorise together */
                for (int64_t j = 0; j < count; ++j) {
                    uint32_t hit = hb[j];
                    nonzero_hits += hit & (uint32_t)((y[b + j] & 0x7FFFFFFFu) != 0);
                    y[b + j] &= hit - 1u;
                    hits += hit;
                }
                if (record) memcpy(record + b, hb, (size_t)count);
                masked += hits;
                nonzero += nonzero_hits;
            }
            break;
        }
#define KEY_AT(i) KEY_MASK(i)
        APPLY_LOOP(uint32_t, 0)
#undef KEY_AT
        break; }
    }
    out[0] = masked;
    out[1] = used;
    out[2] = nonzero;
    energy[0] += energy_sums.all;
    energy[1] += energy_sums.masked;
}
