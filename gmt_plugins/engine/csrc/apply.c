/* Masking one tensor (native_rank.apply): gmt_apply applies a cut of gmt_rank_group (or of the
 * per-pass engine) to one member of the group, computing each entry's key again as it goes.
 *
 * Zero, in place, the entries of src->x whose key is below `threshold`, then the first `ties` whose
 * key equals it (in position order); +0.0 replaces them. record (or NULL) receives the mask as
 * bytes. out: masked count, ties used, and how many masked entries were nonzero before (the
 * masked_nonzero statistic, counted before zeroing; -0.0 counts as zero, and masked entries are
 * always finite: the cut never reaches the excluded keys). While ties remain, blocks of 64 are
 * first tested (vectorised) for a key equal to the threshold, and only such blocks run the loop that
 * spends ties; the global scope's budget may wait for its ties in a late tensor, so this phase can
 * span whole tensors. */
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
    case KIND_RANDOM_16: { const uint16_t *x = (const uint16_t *)src->x; uint16_t e = (src->flags & SOURCE_FP16) ? 0x7C00u : 0x7F80u;
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

/* gmt_apply on entries i..i+n of src (source_part), ties carried over in *ties and the counts added to
 * counts (masked, ties used, masked nonzero); sums (or NULL) is added the part's sum of g^2 before and
 * after it is masked (energy.c), taken while the part is in cache. The block loops of gmt_apply_energy
 * and gmt_apply_tracked (coverage.c) are made of it. */
static inline void apply_part(const source_t *src, int64_t i, int64_t n, uint64_t threshold, int64_t *ties, uint8_t *record,
                              int64_t *counts, double *sums) {
    const source_t part = source_part(src, i, n);
    const int32_t value = energy_value_kind(src);
    int64_t part_out[3];
    if (sums) sums[0] += energy_sum(part.x, value, n);
    gmt_apply(&part, threshold, *ties, record, part_out);
    if (sums) sums[1] += energy_sum(part.x, value, n);
    counts[0] += part_out[0];
    counts[1] += part_out[1];
    counts[2] += part_out[2];
    *ties -= part_out[1];
}

/* gmt_apply with the sums of energy.c: blocks of ENERGY_BLOCK entries are each summed, masked by
 * gmt_apply (ties spent block after block, in position order) and summed again; out as gmt_apply's,
 * energy[0] and energy[1] added the sums before and after masking. */
VECTOR_CLONES void gmt_apply_energy(const source_t *src, uint64_t threshold, int64_t ties, uint8_t *record, int64_t *out,
                                    double *energy) {
    int64_t counts[3] = {0, 0, 0};
    double sums[2] = {0.0, 0.0};
    for (int64_t i = 0; i < src->n; i += ENERGY_BLOCK)
        apply_part(src, i, src->n - i < ENERGY_BLOCK ? src->n - i : ENERGY_BLOCK, threshold, &ties, record ? record + i : NULL,
                   counts, sums);
    memcpy(out, counts, sizeof counts);
    energy[0] += sums[0];
    energy[1] += sums[1];
}
