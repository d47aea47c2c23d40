/* id3's growth step (gmt_plugins/native_id3.py).
 *
 * id3 adds, to the updatable set, the `k` not-yet-updatable entries with the largest score
 * |g| / (eps + |theta|)^exponent over all tensors (ties in position order, tensors in order). Its
 * torch twin is ScoreKeys(largest=True, excluded=updatable) + cut_for_count + mark in
 * gmt_plugins/strategies/id3.py; this computes the same keys in C, bit for bit:
 *   score  = |g| / D(eps + |theta|) in float32, D by exponent: 0 -> 1, 1 -> d, 2 -> d*d,
 *            3 -> (d*d)*d (what torch's pow does for those exponents; its pow(d, 0.5) is not
 *            always the correctly rounded sqrtf(d), so that exponent stays with torch);
 *   key    = 0x7F7FFFFF - bits(|score|), NaN score -> 0 bits, inf -> FLT_MAX bits;
 *   key    = 0x7F800000 (excluded) where g is not finite or the entry is already updatable.
 * The k smallest keys are chosen and written into both byte masks (updatable = 1, masked = 0).
 *
 * Two ways to the same set. Warm: given a window of top digits [wlo, whi] (around the previous
 * step's boundary), one vectorised read counts the keys below it (keeping their positions, at most
 * k of them) and keeps the keys and positions inside it; when the k-th key falls inside, the
 * threshold is found among those candidates and only the kept positions are written: one read, no
 * histogram, no second pass. Otherwise (or with no window): the radix passes of the engine (top
 * digit histogram over 4 interleaved tables, low digit inside the boundary bin) and a marking pass.
 * The window never changes the result, only the time. Masks are only written once the threshold is
 * known, so a failed warm read leaves nothing to undo. */
#include <math.h>

typedef struct {
    const uint32_t *g;   /* gradient, fp32 bits */
    const float *theta;  /* parameter, fp32 */
    uint8_t *updatable;  /* bool bytes: 1 = updatable */
    uint8_t *masked;     /* bool bytes: 1 = still masked (the negation of updatable) */
    int64_t n;
} id3_source_t;

/* inlined into both clones of gmt_id3_grow: a helper left out of line would be built for the
 * portable target only */
#define ID3_INLINE static inline __attribute__((always_inline))
#define ID3_CAP 0x7F800000u
#define ID3_MAX 0x7F7FFFFFu

ID3_INLINE uint32_t id3_key(uint32_t gb, float denom, uint8_t still_masked) {
    uint32_t ab = gb & 0x7FFFFFFFu, b;
    float a, s;
    memcpy(&a, &ab, 4);
    s = a / denom;
    memcpy(&b, &s, 4);
    b &= 0x7FFFFFFFu;
    b = b > 0x7F800000u ? 0u : b;
    b = b == 0x7F800000u ? ID3_MAX : b;
    uint32_t out = ((gb & 0x7F800000u) == 0x7F800000u) | (still_masked == 0);
    return out ? ID3_CAP : ID3_MAX - b;
}

#define ID3_D0(t) ((void)(t), (void)eps, 1.0f)
#define ID3_D1(t) (eps + fabsf(t))
#define ID3_D2(t) ((eps + fabsf(t)) * (eps + fabsf(t)))
#define ID3_D3(t) (((eps + fabsf(t)) * (eps + fabsf(t))) * (eps + fabsf(t)))
#define ID3_NONFINITE(i) ((g[i] & 0x7F800000u) == 0x7F800000u)

/* Keys are computed a block at a time (vectorised: 32 entries fill the 256-bit lanes of the AVX2
 * clone, 16 leave them half used) and the rare entries a pass acts on are then found by a scalar
 * loop over the block, which runs only when the block holds one. */
#define ID3_BLOCK 32
/* one bit per entry of a block, for the entries a pass acts on */
#define ID3_BITS_T uint32_t
#define ID3_KEY(i, DENOM) id3_key(g[i], DENOM(th[i]), m[i])

#if GMT_HAVE_AVX2_SCAN
/* The warm read's blocks with AVX2 (id3_scan_* below is its portable twin, GMT_PLUGINS_NO_AVX2_SCAN=1):
 * the keys eight at a time exactly as id3_key computes them (IEEE division and products, no fma: the
 * target has none), and the bitmask of the keys below `hi` from the compares, so that only the
 * entries below or inside the window are visited one by one. Returns where the blocks end, or -1
 * when a buffer overflowed (the warm read then gives up, as the portable one does). */
__attribute__((target("avx2,popcnt"))) static int64_t id3_scan_avx2(const id3_source_t *s, float eps, int kind, uint32_t lo, uint32_t hi,
                                                                    int64_t pos0, int64_t *below_io, int64_t *list, int64_t list_cap,
                                                                    uint32_t *ck, int64_t *cp, int64_t cand_cap, int64_t *nc_io,
                                                                    int64_t *excluded_io, int64_t *nonfinite_io) {
    const uint32_t *g = s->g;
    const float *th = s->theta;
    const uint8_t *m = s->masked;
    const int64_t n = s->n;
    const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF), cap = _mm256_set1_epi32((int32_t)ID3_CAP);
    const __m256i top = _mm256_set1_epi32((int32_t)ID3_MAX), vhi = _mm256_set1_epi32((int32_t)hi), zero = _mm256_setzero_si256();
    const __m256 veps = _mm256_set1_ps(eps), one = _mm256_set1_ps(1.0f);
    int64_t i = 0, b = *below_io, c = *nc_io, ex = 0, nf = 0;
    for (; i + ID3_BLOCK <= n; i += ID3_BLOCK) {
        uint32_t k[ID3_BLOCK], hits = 0;
        for (int v = 0; v < ID3_BLOCK / 8; ++v) {
            const int64_t at = i + 8 * v;
            __m256i gb = _mm256_loadu_si256((const __m256i *)(g + at));
            __m256 t = _mm256_castsi256_ps(_mm256_and_si256(_mm256_castps_si256(_mm256_loadu_ps(th + at)), magnitude));
            __m256 d = _mm256_add_ps(veps, t), denom;
            switch (kind) {
            case 0: denom = one; break;
            case 1: denom = d; break;
            case 2: denom = _mm256_mul_ps(d, d); break;
            default: denom = _mm256_mul_ps(_mm256_mul_ps(d, d), d); break;
            }
            __m256 score = _mm256_div_ps(_mm256_castsi256_ps(_mm256_and_si256(gb, magnitude)), denom);
            __m256i bits = _mm256_and_si256(_mm256_castps_si256(score), magnitude);
            bits = _mm256_andnot_si256(_mm256_cmpgt_epi32(bits, cap), bits);  /* NaN score: 0 */
            bits = _mm256_add_epi32(bits, _mm256_cmpeq_epi32(bits, cap));     /* inf: FLT_MAX */
            __m256i key = _mm256_sub_epi32(top, bits);
            __m256i bad = _mm256_cmpeq_epi32(_mm256_and_si256(gb, cap), cap);
            __m256i done = _mm256_cmpeq_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(m + at))), zero);
            key = _mm256_blendv_epi8(key, cap, _mm256_or_si256(bad, done));
            _mm256_storeu_si256((__m256i *)(k + 8 * v), key);
            hits |= (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(vhi, key))) << (8 * v);
            ex += __builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(key, cap))));
            nf += __builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(bad)));
        }
        for (; hits; hits &= hits - 1) {
            int j = __builtin_ctz(hits);
            if (k[j] < lo) {
                if (b >= list_cap) return -1;
                list[b++] = pos0 + i + j;
            } else {
                if (c >= cand_cap) return -1;
                ck[c] = k[j]; cp[c] = pos0 + i + j; c += 1;
            }
        }
    }
    *below_io = b; *nc_io = c; *excluded_io += ex; *nonfinite_io += nf;
    return i;
}
#endif

/* the warm read's AVX2 blocks (id3_scan_avx2), where the CPU has AVX2 and the environment allows */
#if GMT_HAVE_AVX2_SCAN
#define ID3_SCAN_VECTOR(KIND)                                                                       \
    if (has_avx2()) {                                                                               \
        i = id3_scan_avx2(s, eps, KIND, lo, hi, pos0, below, list, list_cap, ck, cp, cand_cap, nc, &ex, &nf); \
        if (i < 0) return 0;                                                                        \
    }
#else
#define ID3_SCAN_VECTOR(KIND)
#endif
/* Per exponent: top-digit histogram (and non-finite count), low digit inside the boundary bin,
 * the marking pass, and the warm read. */
#define ID3_PASSES(NAME, DENOM, KIND)                                                                  \
    ID3_INLINE void id3_hist_##NAME(const id3_source_t *s, float eps, uint32_t *hist, int tables,   \
                                    int64_t *nonfinite) {                                           \
        const uint32_t *g = s->g; const float *th = s->theta; const uint8_t *m = s->masked;         \
        const int64_t n = s->n;                                                                     \
        int64_t i = 0, nf = 0;                                                                      \
        uint32_t *h1 = hist + (tables > 1 ? BINS : 0), *h2 = hist + (tables > 1 ? 2 * BINS : 0);    \
        uint32_t *h3 = hist + (tables > 1 ? 3 * BINS : 0);                                          \
        for (; i + ID3_BLOCK <= n; i += ID3_BLOCK) {                                                \
            uint32_t k[ID3_BLOCK], f = 0;                                                           \
            for (int j = 0; j < ID3_BLOCK; ++j) {                                                   \
                k[j] = ID3_KEY(i + j, DENOM);                                                              \
                f += ID3_NONFINITE(i + j);                                                          \
            }                                                                                       \
            nf += f;                                                                                \
            for (int j = 0; j < ID3_BLOCK; j += 4) {                                                \
                hist[k[j] >> 16] += 1;                                                              \
                h1[k[j + 1] >> 16] += 1;                                                            \
                h2[k[j + 2] >> 16] += 1;                                                            \
                h3[k[j + 3] >> 16] += 1;                                                            \
            }                                                                                       \
        }                                                                                           \
        for (; i < n; ++i) {                                                                        \
            hist[ID3_KEY(i, DENOM) >> 16] += 1;                                                            \
            nf += ID3_NONFINITE(i);                                                                 \
        }                                                                                           \
        *nonfinite = nf;                                                                            \
    }                                                                                               \
    ID3_INLINE void id3_low_##NAME(const id3_source_t *s, float eps, uint32_t digit, uint32_t *hist) { \
        const uint32_t *g = s->g; const float *th = s->theta; const uint8_t *m = s->masked;         \
        const int64_t n = s->n;                                                                     \
        int64_t i = 0;                                                                              \
        for (; i + ID3_BLOCK <= n; i += ID3_BLOCK) {                                                \
            uint32_t k[ID3_BLOCK];                                                                  \
            ID3_BITS_T hits = 0;                                                                    \
            for (int j = 0; j < ID3_BLOCK; ++j) {                                                   \
                k[j] = ID3_KEY(i + j, DENOM);                                                       \
                hits |= (ID3_BITS_T)((k[j] >> 16) == digit) << j;                                   \
            }                                                                                       \
            for (; hits; hits &= hits - 1) hist[k[__builtin_ctz(hits)] & 0xFFFFu] += 1;           \
        }                                                                                           \
        for (; i < n; ++i) {                                                                        \
            uint32_t key = ID3_KEY(i, DENOM);                                                              \
            if ((key >> 16) == digit) hist[key & 0xFFFFu] += 1;                                     \
        }                                                                                           \
    }                                                                                               \
    ID3_INLINE int64_t id3_mark_##NAME(const id3_source_t *s, float eps, uint32_t threshold,        \
                                       int64_t *ties) {                                             \
        const uint32_t *g = s->g; const float *th = s->theta;                                       \
        uint8_t *m = s->masked, *u = s->updatable;                                                  \
        const int64_t n = s->n;                                                                     \
        int64_t i = 0, marked = 0, t = *ties;                                                       \
        for (; i + ID3_BLOCK <= n; i += ID3_BLOCK) {                                                \
            uint32_t k[ID3_BLOCK];                                                                  \
            ID3_BITS_T hits = 0;                                                                    \
            for (int j = 0; j < ID3_BLOCK; ++j) {                                                   \
                k[j] = ID3_KEY(i + j, DENOM);                                                       \
                hits |= (ID3_BITS_T)(k[j] <= threshold) << j;                                       \
            }                                                                                       \
            for (; hits; hits &= hits - 1) {                                                        \
                int j = __builtin_ctz(hits);                                                      \
                ID3_MARK_ONE(k[j], i + j)                                                           \
            }                                                                                       \
        }                                                                                           \
        for (; i < n; ++i) {                                                                        \
            uint32_t key = ID3_KEY(i, DENOM);                                                              \
            ID3_MARK_ONE(key, i)                                                                    \
        }                                                                                           \
        *ties = t;                                                                                  \
        return marked;                                                                              \
    }                                                                                               \
    /* 0 when the window cannot hold the answer (more than k keys below it, or a buffer full) */    \
    ID3_INLINE int id3_scan_##NAME(const id3_source_t *s, float eps, uint32_t lo, uint32_t hi,      \
                                   int64_t pos0, int64_t *below, int64_t *list, int64_t list_cap,   \
                                   uint32_t *ck, int64_t *cp, int64_t cand_cap, int64_t *nc,        \
                                   int64_t *excluded, int64_t *nonfinite) {                         \
        const uint32_t *g = s->g; const float *th = s->theta; const uint8_t *m = s->masked;         \
        const int64_t n = s->n;                                                                     \
        int64_t i = 0, b, c, ex = 0, nf = 0;                                                        \
        ID3_SCAN_VECTOR(KIND)                                                                       \
        b = *below; c = *nc;                                                                        \
        for (; i + ID3_BLOCK <= n; i += ID3_BLOCK) {                                                \
            uint32_t k[ID3_BLOCK], ee = 0, ff = 0;                                                  \
            ID3_BITS_T hits = 0;                                                                    \
            for (int j = 0; j < ID3_BLOCK; ++j) {                                                   \
                k[j] = ID3_KEY(i + j, DENOM);                                                       \
                hits |= (ID3_BITS_T)(k[j] < hi) << j;                                               \
                ee += k[j] >= ID3_CAP;                                                              \
                ff += ID3_NONFINITE(i + j);                                                         \
            }                                                                                       \
            ex += ee;                                                                               \
            nf += ff;                                                                               \
            for (; hits; hits &= hits - 1) {                                                        \
                int j = __builtin_ctz(hits);                                                      \
                ID3_KEEP_ONE(k[j], i + j)                                                           \
            }                                                                                       \
        }                                                                                           \
        for (; i < n; ++i) {                                                                        \
            uint32_t key = ID3_KEY(i, DENOM);                                                              \
            ex += key >= ID3_CAP;                                                                   \
            nf += ID3_NONFINITE(i);                                                                 \
            ID3_KEEP_ONE(key, i)                                                                    \
        }                                                                                           \
        *below = b; *nc = c; *excluded = ex; *nonfinite = nf;                                       \
        return 1;                                                                                   \
    }

/* marking: below the threshold, or equal to it while ties remain (position order) */
#define ID3_MARK_ONE(KEY, AT)                                                                       \
    {                                                                                               \
        uint32_t key_ = (KEY);                                                                      \
        int hit_ = key_ < threshold;                                                                \
        if (key_ == threshold && key_ < ID3_CAP && t > 0) { hit_ = 1; t -= 1; }                     \
        if (hit_) { u[AT] = 1; m[AT] = 0; marked += 1; }                                            \
    }
/* the warm read: the position of a key below the window, the key and position of one inside */
#define ID3_KEEP_ONE(KEY, AT)                                                                       \
    {                                                                                               \
        uint32_t key_ = (KEY);                                                                      \
        if (key_ < lo) {                                                                            \
            if (b >= list_cap) return 0;                                                            \
            list[b++] = pos0 + (AT);                                                                \
        } else if (key_ < hi) {                                                                     \
            if (c >= cand_cap) return 0;                                                            \
            ck[c] = key_; cp[c] = pos0 + (AT); c += 1;                                              \
        }                                                                                           \
    }

ID3_PASSES(e0, ID3_D0, 0)
ID3_PASSES(e1, ID3_D1, 1)
ID3_PASSES(e2, ID3_D2, 2)
ID3_PASSES(e3, ID3_D3, 3)

/* exponent kinds (native_id3.EXPONENT_KINDS) */
#define ID3_DISPATCH(kind, CALL)                                                                    \
    switch (kind) {                                                                                 \
    case 0: CALL(e0); break;                                                                        \
    case 1: CALL(e1); break;                                                                        \
    case 2: CALL(e2); break;                                                                        \
    default: CALL(e3); break;                                                                       \
    }

/* Write the sorted global positions pos[0..npos) into the masks; per-tensor counts to marked. The
 * tensor's bounds and pointers live in locals: byte stores may alias the struct, which would
 * otherwise be read again for every position. */
ID3_INLINE void id3_mark_positions(const id3_source_t *src, int64_t count, const int64_t *pos, int64_t npos,
                                   int64_t *marked) {
    int64_t t = 0, offset = 0, end = count ? src[0].n : 0, added = 0;
    uint8_t *u = count ? src[0].updatable : 0, *m = count ? src[0].masked : 0;
    for (int64_t j = 0; j < npos; ++j) {
        int64_t at = pos[j];
        if (at >= end) {
            marked[t] += added;
            added = 0;
            do { offset = end; ++t; end = offset + src[t].n; } while (at >= end);
            u = src[t].updatable;
            m = src[t].masked;
        }
        u[at - offset] = 1;
        m[at - offset] = 0;
        added += 1;
    }
    if (npos) marked[t] += added;
}

/* The warm read (see the comment at the top): 1 when it found and marked the answer. */
ID3_INLINE int id3_grow_window(const id3_source_t *src, int64_t count, float eps, int32_t kind, int64_t k,
                           int64_t wlo, int64_t whi, uint32_t *hist, int64_t *list, int64_t list_cap,
                           uint32_t *ck, int64_t *cp, int64_t cand_cap, int64_t *nonfinite, int64_t *marked,
                           int64_t *out) {
    uint64_t lo64 = (uint64_t)wlo << 16, hi64 = (uint64_t)(whi + 1) << 16;
    if (hi64 > ID3_CAP) hi64 = ID3_CAP;
    if (lo64 >= hi64) return 0;
    uint32_t lo = (uint32_t)lo64, hi = (uint32_t)hi64;
    if (list_cap > k) list_cap = k;
    int64_t below = 0, nc = 0, excluded_all = 0, total = 0;
    for (int64_t t = 0; t < count; ++t) {
        int64_t excluded = 0, nf = 0;
#define ID3_SCAN(NAME) if (!id3_scan_##NAME(&src[t], eps, lo, hi, total, &below, list, list_cap, ck, cp, cand_cap, &nc, &excluded, &nf)) return 0
        ID3_DISPATCH(kind, ID3_SCAN)
#undef ID3_SCAN
        nonfinite[t] = nf;
        excluded_all += excluded;
        total += src[t].n;
    }
    int64_t rankable = total - excluded_all;
    int64_t want = k < rankable ? k : rankable;
    if (want <= below || want > below + nc) return 0;
    /* the (want - below)-th smallest candidate: its top digit, then its low digit */
    int64_t remaining = want - below, seen = 0;
    for (int64_t j = 0; j < nc; ++j) hist[ck[j] >> 16] += 1;
    uint32_t top = lo >> 16;
    for (; top < (hi >> 16); ++top) {
        if (seen + hist[top] >= remaining) break;
        seen += hist[top];
    }
    for (int64_t j = 0; j < nc; ++j) hist[ck[j] >> 16] = 0;
    remaining -= seen;
    for (int64_t j = 0; j < nc; ++j) if ((ck[j] >> 16) == top) hist[ck[j] & 0xFFFFu] += 1;
    uint32_t low = 0;
    int64_t under = 0;
    for (; low < BINS; ++low) {
        if (under + hist[low] >= remaining) break;
        under += hist[low];
    }
    int64_t in_bin = hist[low];
    for (int64_t j = 0; j < nc; ++j) hist[ck[j] & 0xFFFFu] = 0;
    remaining -= under;
    uint32_t threshold = (top << 16) | low;
    int64_t ties = remaining == in_bin ? 0 : remaining;
    if (!ties) threshold += 1;
    /* below the window: every kept position; inside: below the threshold, then the first ties */
    id3_mark_positions(src, count, list, below, marked);
    int64_t kept = 0;
    for (int64_t j = 0; j < nc; ++j) {
        int take = ck[j] < threshold;
        if (ck[j] == threshold && ties > 0) { take = 1; ties -= 1; }
        if (take) cp[kept++] = cp[j];
    }
    id3_mark_positions(src, count, cp, kept, marked);
    out[0] = threshold; out[1] = remaining == in_bin ? 0 : remaining; out[2] = rankable; out[3] = top; out[4] = 1;
    out[5] = below; out[6] = nc;
    return 1;
}

/* The radix passes and a marking pass (the cold path). */
ID3_INLINE void id3_grow_histograms(const id3_source_t *src, int64_t count, float eps, int32_t kind, int64_t k,
                                uint32_t *hist, int64_t *nonfinite, int64_t *marked, int64_t *out) {
    const uint32_t cap_digit = ID3_CAP >> 16;
    int64_t total = 0;
    for (int64_t t = 0; t < count; ++t) total += src[t].n;
    int tables = total >= MANY_TABLES_FROM ? TABLES : 1;
    for (int64_t t = 0; t < count; ++t) {
#define ID3_HIST(NAME) id3_hist_##NAME(&src[t], eps, hist, tables, &nonfinite[t])
        ID3_DISPATCH(kind, ID3_HIST)
#undef ID3_HIST
    }
    int64_t excluded = 0;
    for (int tb = 0; tb < tables; ++tb) excluded += hist[((uint32_t)tb << 16) | cap_digit];
    int64_t rankable = total - excluded;
    int64_t want = k < rankable ? k : rankable;
    out[0] = -1; out[1] = 0; out[2] = rankable; out[3] = -1; out[4] = 2; out[5] = 0; out[6] = 0;
    uint32_t digit = 0;
    int64_t below = 0;
    if (want > 0) {
        for (digit = 0; digit < cap_digit; ++digit) {
            int64_t c = 0;
            for (int tb = 0; tb < tables; ++tb) c += hist[((uint32_t)tb << 16) | digit];
            if (below + c >= want) break;
            below += c;
        }
    }
    for (int tb = 0; tb < tables; ++tb) memset(hist + ((size_t)tb << 16), 0, (cap_digit + 1) * sizeof(uint32_t));
    if (want <= 0) return;
    for (int64_t t = 0; t < count; ++t) {
#define ID3_LOW(NAME) id3_low_##NAME(&src[t], eps, digit, hist)
        ID3_DISPATCH(kind, ID3_LOW)
#undef ID3_LOW
    }
    int64_t remaining = want - below, under = 0;
    uint32_t low;
    for (low = 0; low < BINS; ++low) {
        if (under + hist[low] >= remaining) break;
        under += hist[low];
    }
    int64_t in_bin = hist[low];
    memset(hist, 0, BINS * sizeof(uint32_t));
    remaining -= under;
    uint32_t threshold = (digit << 16) | low;
    int64_t ties = remaining == in_bin ? 0 : remaining;
    if (!ties) threshold += 1;
    out[0] = threshold; out[1] = ties; out[3] = digit;
    for (int64_t t = 0; t < count; ++t) {
#define ID3_MARK(NAME) marked[t] += id3_mark_##NAME(&src[t], eps, threshold, &ties)
        ID3_DISPATCH(kind, ID3_MARK)
#undef ID3_MARK
    }
}

/* One growth step. k > 0 entries wanted; window [wlo, whi] of top digits or wlo > whi for none;
 * hist: TABLES * 65536 zeroed uint32 (returned zeroed); list: list_cap int64; candidates: cand_cap
 * uint32 keys and int64 positions. nonfinite[t] and marked[t] receive each tensor's non-finite
 * gradient count and newly updatable entries. out: threshold key, ties, rankable, boundary top
 * digit (-1 if nothing was chosen), path (1 = warm read, 2 = histogram passes), and for the warm
 * read the keys below the window and the candidates inside it (0 otherwise). The caller keeps
 * the group below 2**32 entries (counts are uint32 per table). */
VECTOR_CLONES void gmt_id3_grow(const id3_source_t *src, int64_t count, float eps, int32_t kind, int64_t k,
                                int64_t wlo, int64_t whi, uint32_t *hist, int64_t *list, int64_t list_cap,
                                uint32_t *cand_key, int64_t *cand_pos, int64_t cand_cap, int64_t *nonfinite,
                                int64_t *marked, int64_t *out) {
    for (int64_t t = 0; t < count; ++t) marked[t] = 0;
    if (wlo >= 0 && whi >= wlo &&
        id3_grow_window(src, count, eps, kind, k, wlo, whi, hist, list, list_cap, cand_key, cand_pos, cand_cap,
                        nonfinite, marked, out))
        return;
    id3_grow_histograms(src, count, eps, kind, k, hist, nonfinite, marked, out);
}
