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

#undef MOVES
