/* Coverage (gmt_plugins/coverage.py CoverageTracker): which entries have ever been updated and how
 * many changed state since the previous step, kept as bit sets; gmt_apply_tracked folds this into
 * gmt_apply (apply.c) so the step's mask is never written out whole.
 *
 * gmt_coverage_observe folds one step's mask of n entries into two bit sets packed eight entries to
 * a byte (entry i is bit i % 8 of byte i / 8; the bits past n stay 0): updated |= not masked,
 * previous = masked.
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
 * used, masked nonzero, set bits of updated, changed (0 when first); energy (or NULL): as
 * gmt_apply_energy's, each block summed before and after it is masked. Returns 0 (did nothing) for
 * another kind of key. */
#define TRACK_BLOCK 8192
VECTOR_CLONES int32_t gmt_apply_tracked(const source_t *src, uint64_t threshold, int64_t ties, uint8_t *updated,
                                        uint8_t *previous, int32_t first, int64_t *out, double *energy) {
    if (src->kind != KIND_F32 && src->kind != KIND_BF16_WIDE && src->kind != KIND_16) return 0;
    uint8_t record[TRACK_BLOCK];
    int64_t counts[3] = {0, 0, 0}, set = 0, changed = 0, fold_out[2];
    double sums[2] = {0.0, 0.0};
    for (int64_t i = 0; i < src->n; i += TRACK_BLOCK) {
        const int64_t n = src->n - i < TRACK_BLOCK ? src->n - i : TRACK_BLOCK;
        apply_part(src, i, n, threshold, &ties, record, counts, energy ? sums : NULL);
        gmt_coverage_observe(record, n, updated + i / 8, previous + i / 8, first, fold_out);
        set += fold_out[0];
        changed += fold_out[1];
    }
    out[0] = counts[0]; out[1] = counts[1]; out[2] = counts[2]; out[3] = set; out[4] = first ? 0 : changed;
    if (energy) { energy[0] += sums[0]; energy[1] += sums[1]; }
    return 1;
}
