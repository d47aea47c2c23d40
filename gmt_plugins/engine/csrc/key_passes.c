/* The passes over one tensor's keys that ranking a group is made of (rank_group.c, and ema_rank.c
 * for scores), one set per kind of key (gmt.h): the first pass (top-digit histogram over TABLES
 * tables), the second pass (low digit inside the boundary bin), the warm scan (counts below the
 * window, copies of the keys in it), a clearing pass and a sampling pass (sample_window). DISPATCH
 * calls the set of a source's kind.
 *
 * The counting stores go to four tables in turn (entry j of a block of 16 to table j % 4) so that
 * equal digits in a row do not wait on each other. Bucket and window tests are
 * vectorised over a block, and the scalar loop behind them runs only for the rare block holding such
 * a key. RECOMPUTE: the key is cheap (a mask of the input), so the rare loop reads it again instead of
 * keeping the block's keys on the stack (twice as fast); expensive keys (the hash) are kept. */
#define KIND_PASSES(NAME, SETUP, KEY, SHIFT, RECOMPUTE)                                             \
    static inline void pass1_##NAME(const source_t *src, uint32_t *hist, int tables) {              \
        SETUP                                                                                       \
        const int64_t n = src->n;                                                                   \
        int64_t i = 0;                                                                              \
        uint32_t *h1 = hist + (tables > 1 ? BINS : 0), *h2 = hist + (tables > 1 ? 2 * BINS : 0);    \
        uint32_t *h3 = hist + (tables > 1 ? 3 * BINS : 0);                                          \
        for (; i + 16 <= n; i += 16) {                                                              \
            if (RECOMPUTE) {                                                                        \
                for (int j = 0; j < 16; j += 4) {                                                   \
                    hist[(KEY(i + j)) >> SHIFT] += 1;                                               \
                    h1[(KEY(i + j + 1)) >> SHIFT] += 1;                                             \
                    h2[(KEY(i + j + 2)) >> SHIFT] += 1;                                             \
                    h3[(KEY(i + j + 3)) >> SHIFT] += 1;                                             \
                }                                                                                   \
            } else {                                                                                \
                uint32_t k[16];                                                                     \
                for (int j = 0; j < 16; ++j) k[j] = (KEY(i + j));                                   \
                for (int j = 0; j < 16; j += 4) {                                                   \
                    hist[k[j] >> SHIFT] += 1;                                                       \
                    h1[k[j + 1] >> SHIFT] += 1;                                                     \
                    h2[k[j + 2] >> SHIFT] += 1;                                                     \
                    h3[k[j + 3] >> SHIFT] += 1;                                                     \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
        for (; i < n; ++i) hist[(KEY(i)) >> SHIFT] += 1;                                            \
    }                                                                                               \
    static void pass2_##NAME(const source_t *src, uint32_t digit, uint32_t *hist) {                 \
        SETUP                                                                                       \
        const int64_t n = src->n;                                                                   \
        int64_t i = 0;                                                                              \
        for (; i + 16 <= n; i += 16) {                                                              \
            uint32_t k[16], any = 0;                                                                \
            for (int j = 0; j < 16; ++j) {                                                          \
                k[j] = (KEY(i + j));                                                                \
                any |= (k[j] >> 16) == digit;                                                       \
            }                                                                                       \
            if (any) {                                                                              \
                for (int j = 0; j < 16; ++j) {                                                      \
                    if ((k[j] >> 16) == digit) hist[k[j] & 0xFFFFu] += 1;                           \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
        for (; i < n; ++i) {                                                                        \
            uint32_t key = (KEY(i));                                                                \
            if ((key >> 16) == digit) hist[key & 0xFFFFu] += 1;                                     \
        }                                                                                           \
    }                                                                                               \
    static void scan_##NAME(const source_t *src, uint32_t lo_key, uint32_t width, uint32_t cap,     \
                            int64_t *below, int64_t *excluded, uint32_t *cand, int64_t cand_cap,    \
                            int64_t *ncp) {                                                         \
        SETUP                                                                                       \
        const int64_t n = src->n;                                                                   \
        int64_t i = 0, nc = *ncp;                                                                   \
        int64_t b = 0, ex = 0;                                                                      \
        if (RECOMPUTE) { /* cheap keys: count 64 at a time, re-read the block that holds a candidate */ \
            for (; i + 64 <= n; i += 64) {                                                          \
                uint32_t any = 0, bb = 0, ee = 0;                                                   \
                for (int j = 0; j < 64; ++j) {                                                      \
                    uint32_t key = (KEY(i + j));                                                    \
                    bb += key < lo_key;                                                             \
                    ee += key >= cap;                                                               \
                    any |= key - lo_key < width;                                                    \
                }                                                                                   \
                b += bb;                                                                            \
                ex += ee;                                                                           \
                if (any) {                                                                          \
                    if (nc + 64 > cand_cap) { nc = cand_cap + 1; break; } /* too many: histograms */ \
                    /* branch-free: every key is stored, the count advances by the test (sampled   \
                     * windows hold a few % of the keys, so a branch per key would mispredict) */   \
                    for (int j = 0; j < 64; ++j) {                                                  \
                        uint32_t key = (KEY(i + j));                                                \
                        cand[nc] = key;                                                             \
                        nc += key - lo_key < width;                                                 \
                    }                                                                               \
                }                                                                                   \
            }                                                                                       \
            if (nc > cand_cap) { *ncp = nc; return; }                                               \
        }                                                                                           \
        for (; i + 16 <= n; i += 16) {                                                              \
            uint32_t k[16], any = 0, bb = 0, ee = 0;                                                \
            for (int j = 0; j < 16; ++j) {                                                          \
                k[j] = (KEY(i + j));                                                                \
                bb += k[j] < lo_key;                                                                \
                ee += k[j] >= cap;                                                                  \
                any |= k[j] - lo_key < width;                                                       \
            }                                                                                       \
            b += bb;                                                                                \
            ex += ee;                                                                               \
            if (any) {                                                                              \
                for (int j = 0; j < 16; ++j) {                                                      \
                    if (k[j] - lo_key < width) { if (nc < cand_cap) cand[nc] = k[j]; nc += 1; }     \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
        for (; i < n; ++i) {                                                                        \
            uint32_t key = (KEY(i));                                                                \
            b += key < lo_key;                                                                      \
            ex += key >= cap;                                                                       \
            if (key - lo_key < width) { if (nc < cand_cap) cand[nc] = key; nc += 1; }               \
        }                                                                                           \
        *below += b;                                                                                \
        *excluded = ex;                                                                             \
        *ncp = nc;                                                                                  \
    }                                                                                               \
    static void clear_##NAME(const source_t *src, uint32_t *hist) {                 \
        SETUP                                                                                       \
        for (int64_t i = 0; i < src->n; ++i) hist[(KEY(i)) >> SHIFT] = 0;                           \
    }                                                                                               \
    static void sample_##NAME(const source_t *src, int64_t i, int64_t end, uint32_t cap, uint32_t *hist, \
                              uint32_t *lo_d, uint32_t *hi_d, int64_t *excluded) {                  \
        SETUP                                                                                       \
        uint32_t lo = *lo_d, hi = *hi_d;                                                            \
        int64_t ex = 0;                                                                             \
        for (; i < end; ++i) {                                                                      \
            uint32_t key = (KEY(i));                                                                \
            hist[key >> 16] += 1;                                                                   \
            lo = (key >> 16) < lo ? (key >> 16) : lo;                                               \
            hi = (key >> 16) > hi ? (key >> 16) : hi;                                               \
            ex += key >= cap;                                                                       \
        }                                                                                           \
        *lo_d = lo; *hi_d = hi; *excluded += ex;                                                    \
    }

KIND_PASSES(f32, SETUP_32, KEY_F32, 16, 1)
KIND_PASSES(bf16_wide, SETUP_16, KEY_BF16_WIDE, 16, 1)
KIND_PASSES(k16, SETUP_16, KEY_16, 0, 1)
KIND_PASSES(random32, SETUP_RANDOM(uint32_t, 0x7F800000u), KEY_RANDOM, 16, 0)
/* s != NULL marks fp16 (exponent 0x7C00) among the 16-bit random kinds, else bf16 (0x7F80) */
KIND_PASSES(random16, SETUP_RANDOM(uint16_t, (src->flags & SOURCE_FP16) ? 0x7C00u : 0x7F80u), KEY_RANDOM, 16, 0)
KIND_PASSES(random64, SETUP_RANDOM(uint64_t, 0x7FF0000000000000ull), KEY_RANDOM, 16, 0)
KIND_PASSES(score, SETUP_SCORE, KEY_SCORE, 16, 1)
KIND_PASSES(mask, SETUP_MASK, KEY_MASK, 0, 1)

#define DISPATCH(src, CALL)                                                                         \
    switch ((src)->kind) {                                                                          \
    case KIND_F32: CALL(f32); break;                                                                \
    case KIND_BF16_WIDE: CALL(bf16_wide); break;                                                    \
    case KIND_16: CALL(k16); break;                                                                 \
    case KIND_RANDOM_32: CALL(random32); break;                                                     \
    case KIND_RANDOM_16: CALL(random16); break;                                                     \
    case KIND_RANDOM_64: CALL(random64); break;                                                     \
    case KIND_SCORE: CALL(score); break;                                                            \
    case KIND_MASK: CALL(mask); break;                                                              \
    }
