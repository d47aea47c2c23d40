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
