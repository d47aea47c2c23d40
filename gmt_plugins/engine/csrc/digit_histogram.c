/* The per-pass histograms of the selection engine (gmt_plugins/selection.py, native.add_histogram):
 * one digit of the magnitude keys (KEY_F32, KEY_BF16_WIDE, KEY_16 in gmt.h) of one tensor per call.
 * Each function adds to hist[0..65537]: hist[0] counts keys below `base`, hist[1 + d] the keys whose
 * digit d = (key - base) >> shift is below 65536, and hist[65537] the keys above. One read of the
 * data, no allocation. The torch passes in gmt_plugins/selection.py are the reference twin. */

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
        TOP_LOOP(KEY_F32)
        return;
    }
    HISTOGRAM_LOOP(KEY_F32)
}

void gmt_hist_bf16_wide(const uint16_t *x, int64_t n, uint32_t base, uint32_t shift, int64_t *hist) {
    if (base == 0 && shift == 16) {
        TOP_LOOP(KEY_BF16_WIDE)
        return;
    }
    HISTOGRAM_LOOP(KEY_BF16_WIDE)
}

void gmt_hist_16(const uint16_t *x, int64_t n, uint32_t base, uint32_t shift, int64_t *hist) {
    if (base == 0 && shift == 0) {
        TOP_LOOP(KEY_16)
        return;
    }
    HISTOGRAM_LOOP(KEY_16)
}

#undef BLOCK
#undef IN_BUCKET
#undef BIN_ONE
#undef HISTOGRAM_LOOP
#undef TOP_LOOP
