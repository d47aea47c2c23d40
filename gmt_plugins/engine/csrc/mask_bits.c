/* Stored masks read as bits (gmt_plugins/strategies/_masks.py StoredMask, native_rank.pack_mask_bits
 * and apply_mask_bits): a strategy's stored set of entries, packed once, is applied at every step
 * from one bit per entry instead of one byte. */

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
 * masked_nonzero (-0.0 counts as zero); record (or NULL) receives the zeroed entries as bytes;
 * energy (or NULL): as gmt_apply_energy's. Without energy, a block with no bit set is not read. */
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
                                       uint8_t *restrict record, int64_t *out, double *energy) {
    int64_t masked = 0, nonzero = 0;
    double before = 0.0, after = 0.0;
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
        uint32_t *restrict z = y + base;
        const double block_before = energy ? energy_sum(z, VALUE_F32, count) : 0.0;
        before += block_before;
        if (any == 0) { /* nothing masked here: the block is not written (nor read, without energy) */
            after += block_before;
            if (record) memset(record + base, 0, (size_t)count);
            continue;
        }
        uint32_t hits = 0, nonzero_hits = 0;
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
        if (energy) after += energy_sum(z, VALUE_F32, count);
    }
    out[0] = masked;
    out[1] = 0;
    out[2] = nonzero;
    if (energy) { energy[0] += before; energy[1] += after; }
}
#undef STORED_BLOCK
