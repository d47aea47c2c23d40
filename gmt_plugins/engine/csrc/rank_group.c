/* Ranking a group of tensors in one call (native_rank.rank_group): gmt_rank_group finds the cut,
 * the threshold key and how many entries equal to it go, that masks the k smallest keys of the
 * group (one tensor for the per-tensor scope, all of them for the global scope), with no allocation
 * (the caller lends zeroed scratch and gets it back zeroed).
 *
 * Cold path (rank_histograms): the top-digit histogram of every tensor, the non-finite count of
 * each, the boundary bin, and the low digit inside it. Warm path (rank_window): given a window of
 * top digits [wlo, whi] (the previous step's boundary bin +- 1, where uniform random keys must
 * fall, or from a sample of this call's keys: sample_window), one read per tensor counts the keys
 * below it and copies the keys inside it to `cand`, with no histogram; when the k-th key falls
 * inside the window it is found among them, otherwise the histogram passes run. The window never
 * changes the result, only the time. */

/* The cold path: the top-digit pass over every tensor, the boundary bin from its counts, and, for
 * 32-bit keys, the low-digit pass inside that bin. Arguments and outputs as gmt_rank_group's. */
static inline __attribute__((always_inline)) void rank_histograms(const source_t *src, int64_t count, uint32_t key_bits,
                            uint32_t cap, double ratio, int64_t k, uint32_t *hist, int64_t *nonfinite, int64_t *out) {
    uint32_t shift = key_bits - 16, cap_digit = cap >> shift;
    int64_t total = 0, excluded_before = 0;
    for (int64_t t = 0; t < count; ++t) total += src[t].n;
    int tables = total >= MANY_TABLES_FROM ? TABLES : 1;
    for (int64_t t = 0; t < count; ++t) {
        const source_t *s = &src[t];
#define PASS1(NAME) pass1_##NAME(s, hist, tables)
        DISPATCH(s, PASS1)
#undef PASS1
        int64_t excluded = 0;
        for (int tb = 0; tb < tables; ++tb)
            for (uint32_t d = cap_digit; d <= TOP_DIGIT; ++d) excluded += hist[((uint32_t)tb << 16) | d];
        nonfinite[t] = excluded - excluded_before;
        excluded_before = excluded;
    }
    int64_t rankable = total - excluded_before;
    int64_t want = k < 0 ? (int64_t)(ratio * (double)rankable) : (k < rankable ? k : rankable);
    out[0] = -1; out[1] = 0; out[2] = rankable; out[3] = -1; out[4] = 0;
    uint32_t digit = 0;
    int64_t below = 0, in_bin = 0;
    if (want > 0) {
        for (digit = 0; digit < cap_digit; ++digit) {
            int64_t c = 0;
            for (int tb = 0; tb < tables; ++tb) c += hist[((uint32_t)tb << 16) | digit];
            if (below + c >= want) { in_bin = c; break; }
            below += c;
        }
    }
    /* give the scratch back zeroed: by revisiting a small group's keys, else wholesale */
    if (total < 4096 && tables == 1) {
        for (int64_t t = 0; t < count; ++t) {
            const source_t *s = &src[t];
#define CLEAR(NAME) clear_##NAME(s, hist)
            DISPATCH(s, CLEAR)
#undef CLEAR
        }
    } else {
        for (int tb = 0; tb < tables; ++tb) memset(hist + ((size_t)tb << 16), 0, (TOP_DIGIT + 1) * sizeof(uint32_t));
    }
    if (want <= 0) return;
    int64_t remaining = want - below;
    out[3] = digit;
    uint64_t prefix = digit;
    if (shift) {
        out[4] = 1;
        for (int64_t t = 0; t < count; ++t) {
            const source_t *s = &src[t];
#define PASS2(NAME) pass2_##NAME(s, digit, hist)
            DISPATCH(s, PASS2)
#undef PASS2
        }
        below = 0;
        uint32_t low;
        for (low = 0; low < BINS; ++low) {
            if (below + hist[low] >= remaining) break;
            below += hist[low];
        }
        in_bin = hist[low];
        remaining -= below;
        prefix = ((uint64_t)digit << 16) | low;
        memset(hist, 0, BINS * sizeof(uint32_t));
    }
    if (remaining == in_bin) { out[0] = (int64_t)prefix + 1; out[1] = 0; }
    else { out[0] = (int64_t)prefix; out[1] = remaining; }
}

/* The window scan of fp32 magnitude keys with AVX2: eight keys per step, the in-window ones packed
 * to the front of the vector by a permutation looked up from the compare's bitmask (compress_lut,
 * cpu_features.c) and stored to cand at once. Branch-free whatever the window's width, so a sampled
 * window of a few % of the keys costs about one read of them. scan_f32 (key_passes.c) is its
 * portable twin. */
#if GMT_HAVE_AVX2_SCAN
__attribute__((target("avx2,popcnt"))) static void scan_f32_avx2(const uint32_t *x, int64_t n, uint32_t lo_key, uint32_t width,
                                                          uint32_t cap, int64_t *below, int64_t *excluded, uint32_t *cand,
                                                          int64_t cand_cap, int64_t *ncp) {
    /* keys are below 2**31 and lo_key + width <= cap <= 2**31 - 1: signed compares are exact */
    const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF), lo = _mm256_set1_epi32((int32_t)lo_key);
    const __m256i hi = _mm256_set1_epi32((int32_t)(lo_key + width)), top = _mm256_set1_epi32((int32_t)cap - 1);
    int64_t nc = *ncp, i = 0, b = 0, ex = 0;
    while (i + 8 <= n) {
        /* counts in 32-bit lanes: flush them every 2**20 blocks, far below overflow */
        __m256i below_acc = _mm256_setzero_si256(), excluded_acc = _mm256_setzero_si256();
        int64_t end = n - i > ((int64_t)8 << 20) ? i + ((int64_t)8 << 20) : n;
        if (nc + (end - i) > cand_cap) end = i + ((cand_cap - nc) & ~(int64_t)7);  /* never past cand */
        if (end - i < 8) { *ncp = cand_cap + 1; return; }  /* the window holds too many keys */
        for (; i + 8 <= end; i += 8) {
            __m256i key = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + i)), magnitude);
            __m256i under = _mm256_cmpgt_epi32(lo, key);          /* key < lo_key */
            __m256i above = _mm256_cmpgt_epi32(key, top);         /* key >= cap */
            __m256i inside = _mm256_andnot_si256(under, _mm256_cmpgt_epi32(hi, key));
            below_acc = _mm256_sub_epi32(below_acc, under);
            excluded_acc = _mm256_sub_epi32(excluded_acc, above);
            int mask = _mm256_movemask_ps(_mm256_castsi256_ps(inside));
            __m256i order = _mm256_loadu_si256((const __m256i *)compress_lut[mask]);
            _mm256_storeu_si256((__m256i *)(cand + nc), _mm256_permutevar8x32_epi32(key, order));
            nc += __builtin_popcount((unsigned)mask);
        }
        uint32_t lanes[8];
        _mm256_storeu_si256((__m256i *)lanes, below_acc);
        for (int j = 0; j < 8; ++j) b += lanes[j];
        _mm256_storeu_si256((__m256i *)lanes, excluded_acc);
        for (int j = 0; j < 8; ++j) ex += lanes[j];
    }
    for (; i < n; ++i) {
        uint32_t key = x[i] & 0x7FFFFFFFu;
        b += key < lo_key;
        ex += key >= cap;
        if (key - lo_key < width) { if (nc < cand_cap) cand[nc] = key; nc += 1; }
    }
    *below += b;
    *excluded = ex;
    *ncp = nc;
}
#endif

/* Warm path: one vectorised read per tensor counts the keys below the window and the excluded ones
 * and copies the window's keys to cand, with no histogram at all; when the k-th key falls inside the
 * window it is found among the candidates (returns 1). Otherwise (returns 0) the caller runs the
 * histogram passes: the result is the same, only slower. */
static inline __attribute__((always_inline)) int rank_window(const source_t *src, int64_t count, uint32_t cap, double ratio, int64_t k,
                       int64_t wlo, int64_t whi, uint32_t *hist, uint32_t *cand, int64_t cand_cap,
                       int64_t *nonfinite, int64_t *out) {
    uint64_t lo64 = (uint64_t)wlo << 16, hi64 = (uint64_t)(whi + 1) << 16;
    if (hi64 > cap) hi64 = cap;
    if (lo64 >= hi64) return 0;
    uint32_t lo_key = (uint32_t)lo64, width = (uint32_t)(hi64 - lo64);
    int64_t below = 0, total = 0, excluded_all = 0, nc = 0;
    for (int64_t t = 0; t < count; ++t) {
        const source_t *s = &src[t];
        int64_t excluded = 0;
#define SCAN(NAME) scan_##NAME(s, lo_key, width, cap, &below, &excluded, cand, cand_cap, &nc)
#if GMT_HAVE_AVX2_SCAN
        if (s->kind == KIND_F32 && cap <= 0x7FFFFFFFu && has_avx2())  /* signed lanes: keys and cap below 2**31 */
            scan_f32_avx2((const uint32_t *)s->x, s->n, lo_key, width, cap, &below, &excluded, cand, cand_cap, &nc);
        else
#endif
        DISPATCH(s, SCAN)
#undef SCAN
        if (nc > cand_cap) return 0;  /* the window held more keys than cand: the histograms decide */
        nonfinite[t] = excluded;
        excluded_all += excluded;
        total += s->n;
    }
    int64_t rankable = total - excluded_all;
    int64_t want = k < 0 ? (int64_t)(ratio * (double)rankable) : (k < rankable ? k : rankable);
    out[0] = -1; out[1] = 0; out[2] = rankable; out[3] = -1; out[4] = 0;
    if (want <= 0) return 1;
    if (want <= below || want > below + nc) return 0;
    /* the (want - below)-th smallest candidate: its top digit from a count of the candidates' top
     * digits, then its low digit from a histogram of the low digits of that top digit's candidates */
    int64_t remaining = want - below, seen = 0;
    uint32_t top = (uint32_t)wlo, low;
    /* then the boundary digit's candidates (a few % of them) are gathered to the front of cand before
     * the low digits are counted, so the 65,536-bin histogram sees only those and is cleared by them */
    int64_t in_top = 0;
    if (whi - wlo < 256) {
        /* a narrow window (the usual case): the top digits' counts fit a small table on the stack */
        uint32_t counts[256] = {0};
        for (int64_t j = 0; j < nc; ++j) counts[(cand[j] >> 16) - (uint32_t)wlo] += 1;
        uint32_t d = 0;
        for (; d < (uint32_t)(whi - wlo); ++d) {
            if (seen + counts[d] >= remaining) break;
            seen += counts[d];
        }
        top = (uint32_t)wlo + d;
    } else {
        for (int64_t j = 0; j < nc; ++j) hist[cand[j] >> 16] += 1;
        for (; top < (uint32_t)whi; ++top) {
            if (seen + hist[top] >= remaining) break;
            seen += hist[top];
        }
        for (int64_t j = 0; j < nc; ++j) hist[cand[j] >> 16] = 0;
    }
    for (int64_t j = 0; j < nc; ++j) {  /* branch-free compaction */
        uint32_t key = cand[j];
        cand[in_top] = key;
        in_top += (key >> 16) == top;
    }
    remaining -= seen;
    /* the low digit: per-bin counts in hist and per-256-bin counts on the stack, so the walk visits
     * at most 256 + 256 bins, not 65,536 */
    uint32_t blocks[256] = {0};
    for (int64_t j = 0; j < in_top; ++j) { hist[cand[j] & 0xFFFFu] += 1; blocks[(cand[j] & 0xFFFFu) >> 8] += 1; }
    int64_t under = 0;
    uint32_t block = 0;
    for (; block < 255; ++block) {
        if (under + blocks[block] >= remaining) break;
        under += blocks[block];
    }
    for (low = block << 8; low < BINS - 1; ++low) {
        if (under + hist[low] >= remaining) break;
        under += hist[low];
    }
    int64_t in_bin = hist[low];
    for (int64_t j = 0; j < in_top; ++j) hist[cand[j] & 0xFFFFu] = 0;
    remaining -= under;
    int64_t prefix = ((int64_t)top << 16) | low;
    out[3] = top;
    if (remaining == in_bin) { out[0] = prefix + 1; out[1] = 0; }
    else { out[0] = prefix; out[1] = remaining; }
    return 1;
}

/* wlo == SAMPLE_WINDOW: the window comes from a sample of the group's keys (sample_window). */
#define SAMPLE_WINDOW (-3)
#ifndef SAMPLE_FROM
#define SAMPLE_FROM (1 << 16)
#endif
#ifndef SAMPLE_MAX
#define SAMPLE_MAX (1 << 16)
#endif
#ifndef SAMPLE_SDS
#define SAMPLE_SDS 4.5
#endif
#ifndef SAMPLE_EXTRA
#define SAMPLE_EXTRA 0
#endif
#ifndef SAMPLE_RUN
#define SAMPLE_RUN 16
#endif

static double square_root(double v) {  /* Newton's iteration: the library links no libm */
    double r = v > 1.0 ? v : 1.0;
    for (int i = 0; i < 64; ++i) r = 0.5 * (r + v / r);
    return r;
}

/* Top digits [*wlo, *whi] that hold the k-th key but for a chance of about 1e-5, from a stratified
 * sample: m keys (about 2 * total**(2/3), at most SAMPLE_MAX), one at a hashed position in each of m
 * equal strata of the group. The window runs from the sample's quantile at p - margin to the one at
 * p + margin, where the margin is SAMPLE_SDS standard deviations of a sample quantile plus two
 * keys, widened to whole digits. Returns 0 (no window) when the sample says the window's keys would
 * overflow cand. Gradients move their scale from step to step (the boundary digit of a SmolLM2
 * tensor moves by tens of digits between steps), so the previous step's boundary is no hint for
 * them; a sample is, at any step. Whatever the sample, the result is exact: a miss costs the
 * histogram passes. */
static inline __attribute__((always_inline)) int sample_window(const source_t *src, int64_t count, int64_t total, uint32_t cap,
                                                               double ratio, int64_t k, uint32_t *hist, int64_t cand_cap,
                                                               int64_t *wlo, int64_t *whi) {
    int bits = 63 - __builtin_clzll((uint64_t)total);
    int64_t m = (int64_t)1 << (2 * bits / 3 + SAMPLE_EXTRA);
    if (m > SAMPLE_MAX) m = SAMPLE_MAX;
    if (m > total) m = total;
    /* runs of SAMPLE_RUN neighbours (one cache line of fp32), one run per stratum: a sample costs
     * m / SAMPLE_RUN memory reads, not m */
    const int64_t runs = m / SAMPLE_RUN > 0 ? m / SAMPLE_RUN : 1, stride = total / runs;
    uint32_t lo_d = TOP_DIGIT, hi_d = 0;
    int64_t t = 0, offset = 0, excluded = 0;
    m = 0;
    for (int64_t r = 0; r < runs; ++r) {
        int64_t at = r * stride + (int64_t)(mix64((uint64_t)r) % (uint64_t)stride);
        while (at >= offset + src[t].n) offset += src[t++].n;
        const source_t *s = &src[t];
        const int64_t end = at - offset + SAMPLE_RUN < s->n ? at - offset + SAMPLE_RUN : s->n;
#define SAMPLE(NAME) sample_##NAME(s, at - offset, end, cap, hist, &lo_d, &hi_d, &excluded)
        DISPATCH(s, SAMPLE)
#undef SAMPLE
        m += end - (at - offset);
    }
    (void)count;
    const int64_t rankable = m - excluded;
    double p = k < 0 ? ratio : (double)k * (double)m / ((double)total * (double)(rankable > 0 ? rankable : 1));
    p = p < 0.0 ? 0.0 : p > 1.0 ? 1.0 : p;
    const double margin = SAMPLE_SDS * square_root(p * (1.0 - p) / (double)(rankable > 0 ? rankable : 1)) + 2.0 / (double)m;
    const double lo_rank = (p - margin) * (double)rankable, hi_rank = (p + margin) * (double)rankable;
    int64_t seen = 0, in_window = 0;
    *wlo = lo_rank < 1.0 ? 0 : -1;
    *whi = -1;
    for (uint32_t d = lo_d; d <= hi_d && *whi < 0; ++d) {
        seen += hist[d];
        if (*wlo < 0 && (double)seen >= lo_rank) *wlo = d;
        if ((double)seen >= hi_rank) *whi = d;
        if (*wlo >= 0) in_window += hist[d];
    }
    memset(hist + lo_d, 0, ((size_t)(hi_d - lo_d) + 1) * sizeof(uint32_t));
    if (*whi < 0 || *whi >= (int64_t)(cap >> 16)) *whi = (int64_t)(cap >> 16) - 1;  /* up to the excluded keys */
    if (rankable <= 0 || *wlo > *whi) return 0;
    /* expected candidates, with room for the sample's error (+25%) */
    return (double)in_window * (double)total / (double)m * 1.25 + 64.0 <= (double)cand_cap;
}

/* Rank a group. key_bits is 16 or 32; cap the excluded-key bound (a multiple of 2**(key_bits-16)).
 * k < 0: k = (int64)(ratio * rankable), else min(k, rankable). window: [wlo, whi] top digits, or
 * wlo > whi for none. hist: TABLES * 65536 zeroed uint32 (returned zeroed); cand: cand_cap uint32.
 * nonfinite[t] receives each tensor's excluded count. out: threshold (-1 = mask nothing), ties,
 * rankable, boundary top digit (-1 if none), 1 if the second pass ran. Counts stay below 2**32
 * per table: the caller routes groups of 2**32 entries or more elsewhere. */
VECTOR_CLONES void gmt_rank_group(const source_t *src, int64_t count, uint32_t key_bits, uint32_t cap, double ratio, int64_t k,
                    int64_t wlo, int64_t whi, uint32_t *hist, uint32_t *cand, int64_t cand_cap,
                    int64_t *nonfinite, int64_t *out) {
    if (key_bits == 32 && wlo == SAMPLE_WINDOW) {
        /* only where the AVX2 scan serves every tensor: the portable scan of a sampled window (a few %
         * of the keys) is no faster than the two histogram passes */
        int64_t total = 0, vector = GMT_HAVE_AVX2_SCAN;
        for (int64_t t = 0; t < count; ++t) total += src[t].n, vector &= src[t].kind == KIND_F32;
        if (!(vector && total >= SAMPLE_FROM && scan_vectorised() &&
              sample_window(src, count, total, cap, ratio, k, hist, cand_cap, &wlo, &whi)))
            wlo = -1, whi = -2;
    }
    if (key_bits == 32 && wlo >= 0 && whi >= wlo &&
        rank_window(src, count, cap, ratio, k, wlo, whi, hist, cand, cand_cap, nonfinite, out))
        return;
    rank_histograms(src, count, key_bits, cap, ratio, k, hist, nonfinite, out);
}

