/* gmt_momentum's EMA update fused with its ranking (gmt_plugins/strategies/gmt_momentum.py,
 * native_rank.ema_rank_group and ema_rank_groups).
 *
 * Sources are KIND_SCORE: x the fp32 gradient, s the fp32 EMA, which this updates in place exactly
 * as gmt_ema_f32 does (first[t] != 0: the tensor's first step, ema = g where finite, else +0). The
 * first read of gradient and EMA, and the one write of the EMA, per tensor (ema_pass1) also count
 * the top digits of the new score keys (KEY_SCORE) of every entry, or of a sample of them, into the
 * histogram tables; the window of top digits that holds the k-th key is chosen from those counts.
 * A second read (ema_scan) records, as gmt_random_rank does, one bit per entry "key below the
 * window" and the keys inside it with their positions, and the k-th key is selected among those
 * (kth_in_window, random_rank.c); gmt_apply_preselected then masks from the bits and candidates.
 * The twin: gmt_ema_f32 (or the torch EMA) followed by gmt_rank_group, or the torch passes, on the
 * updated EMA. */
#define EMA_CAP 0x7F800000u
/* half-width of the sampled window in standard deviations of the sampled rank (plus two keys) */
#define EMA_SIGMAS 4.5

/* the EMA of one chunk in place (gmt_ema_f32's arithmetic); returns its non-finite gradient count */
static inline __attribute__((always_inline)) int64_t ema_chunk(float *restrict e, const float *restrict g, int64_t n, float a, float b,
                                                               int first) {
    const uint32_t *gb = (const uint32_t *)g;
    int64_t bad = 0;
    if (first) {
        for (int64_t i = 0; i < n; ++i) {
            uint32_t nonfinite = (gb[i] & 0x7F800000u) == 0x7F800000u;
            e[i] = nonfinite ? 0.0f : g[i];
            bad += nonfinite;
        }
    } else {
        for (int64_t i = 0; i < n; ++i) {
            uint32_t nonfinite = (gb[i] & 0x7F800000u) == 0x7F800000u;
            float old = e[i];
            float p = a * old;
            float q = b * g[i];
            float next = p + q;
            /* an and-or select on the bits: a float select here keeps the loop scalar */
            uint32_t ob, nb, keep = 0u - nonfinite;
            memcpy(&ob, &old, sizeof ob);
            memcpy(&nb, &next, sizeof nb);
            uint32_t r = (ob & keep) | (nb & ~keep);
            memcpy(&e[i], &r, sizeof r);
            bad += nonfinite;
        }
    }
    return bad;
}

/* One tensor, EMA_CHUNK entries at a time: the EMA update, then (from cache) the top digits of the
 * new keys of one entry of every 2**sample_shift into the tables, drawn at a varying place in its
 * stratum (a Weyl sequence: one multiply) so that no row length aliases with the stride, as every
 * 8th entry of rows whose scales vary along the row would (the tensor's last, partial stratum takes
 * its first entry). Returns the excluded (non-finite gradient) count, of every entry. */
#define EMA_CHUNK 2048
static inline __attribute__((always_inline)) int64_t ema_pass1(const source_t *src, float a, float b, int first, uint32_t *hist,
                                                               int tables, uint32_t sample_shift) {
    float *ema = (float *)(uintptr_t)src->s;
    uint32_t *h1 = hist + (tables > 1 ? BINS : 0), *h2 = hist + (tables > 1 ? 2 * BINS : 0);
    uint32_t *h3 = hist + (tables > 1 ? 3 * BINS : 0);
    const int64_t step = (int64_t)1 << sample_shift;
    int64_t excluded = 0;
    for (int64_t c = 0; c < src->n; c += EMA_CHUNK) {
        const int64_t m = src->n - c < EMA_CHUNK ? src->n - c : EMA_CHUNK;
        excluded += ema_chunk(ema + c, (const float *)src->x + c, m, a, b, first);
        const uint32_t *x = (const uint32_t *)src->x + c, *sc = (const uint32_t *)src->s + c;
        int64_t i = 0;
        if (sample_shift == 0) {
            for (; i + 4 <= m; i += 4) {
                hist[KEY_SCORE(i) >> 16] += 1;
                h1[KEY_SCORE(i + 1) >> 16] += 1;
                h2[KEY_SCORE(i + 2) >> 16] += 1;
                h3[KEY_SCORE(i + 3) >> 16] += 1;
            }
        } else {
            const uint32_t down = 32u - sample_shift, golden = 2654435769u;  /* 2**32 / phi */
            uint32_t weyl = (uint32_t)((uint64_t)c >> sample_shift) * golden;      /* stratum number * golden */
            for (; i + 4 * step <= m; i += 4 * step) {
                const int64_t i0 = i + (int64_t)(weyl >> down), i1 = i + step + (int64_t)((weyl + golden) >> down);
                const int64_t i2 = i + 2 * step + (int64_t)((weyl + 2 * golden) >> down);
                const int64_t i3 = i + 3 * step + (int64_t)((weyl + 3 * golden) >> down);
                weyl += 4 * golden;
                hist[KEY_SCORE(i0) >> 16] += 1;
                h1[KEY_SCORE(i1) >> 16] += 1;
                h2[KEY_SCORE(i2) >> 16] += 1;
                h3[KEY_SCORE(i3) >> 16] += 1;
            }
            for (; i + step <= m; i += step, weyl += golden) {
                const int64_t at = i + (int64_t)(weyl >> down);
                hist[KEY_SCORE(at) >> 16] += 1;
            }
        }
        for (; i < m; i += step) hist[KEY_SCORE(i) >> 16] += 1;
    }
    return excluded;
}

/* One tensor's second read (the EMA, and the gradient only where the tensor holds a non-finite
 * entry): bits of "key < lo", the keys in [lo, lo + width) with their positions, the count below. */
#define EMA_SCAN_BODY(KEY)                                                                          \
    for (; i + 64 <= n; i += 64) {                                                                  \
        uint8_t f[64], in[64];                                                                      \
        uint32_t bb = 0, any = 0;                                                                   \
        for (int j = 0; j < 64; ++j) { uint32_t key = KEY(i + j); f[j] = (uint8_t)(key < lo); bb += key < lo; } \
        for (int j = 0; j < 64; ++j) any |= KEY(i + j) - lo < width;                                \
        below += bb;                                                                                \
        bits[i >> 6] = pack_flags64(f);                                                             \
        if (any) {                                                                                  \
            for (int j = 0; j < 64; ++j) in[j] = (uint8_t)(KEY(i + j) - lo < width);                \
            for (uint64_t w = pack_flags64(in); w; w &= w - 1) {                                    \
                int j = __builtin_ctzll(w);                                                         \
                if (nc < cand_cap) { cand_key[nc] = KEY(i + j); cand_pos[nc] = i + j; }             \
                nc += 1;                                                                            \
            }                                                                                       \
        }                                                                                           \
    }                                                                                               \
    {                                                                                               \
        uint64_t w = 0;                                                                             \
        for (; i < n; ++i) {                                                                        \
            uint32_t key = KEY(i);                                                                  \
            w |= (uint64_t)(key < lo) << (i & 63);                                                  \
            below += key < lo;                                                                      \
            if (key - lo < width) {                                                                 \
                if (nc < cand_cap) { cand_key[nc] = key; cand_pos[nc] = i; }                        \
                nc += 1;                                                                            \
            }                                                                                       \
        }                                                                                           \
        if (n & 63) bits[n >> 6] = w;                                                               \
    }

#if GMT_HAVE_AVX2_SCAN
/* ema_scan's blocks of 64 with AVX2: the keys eight at a time (score_key's clamps as compares), the
 * block's bits and its window test straight from the compares' bitmasks; the window's keys (a few %
 * of the blocks hold one) are then taken one by one. Returns where the blocks end: EMA_SCAN_BODY's
 * tail does the rest, and EMA_SCAN_BODY alone is the portable twin (GMT_PLUGINS_NO_AVX2_SCAN=1). */
__attribute__((target("avx2,popcnt"))) static int64_t ema_scan_avx2(const uint32_t *x, const uint32_t *sc, int64_t n, int with_grad,
                                                                    uint32_t lo, uint32_t width, uint64_t *bits, uint32_t *cand_key,
                                                                    int64_t *cand_pos, int64_t cand_cap, int64_t *below_io,
                                                                    int64_t *nc_io) {
    /* keys are at most EMA_CAP < 2**31 and lo + width <= EMA_CAP: signed compares are exact */
    const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF), inf = _mm256_set1_epi32((int32_t)EMA_CAP);
    const __m256i vlo = _mm256_set1_epi32((int32_t)lo), vhi = _mm256_set1_epi32((int32_t)(lo + width));
    int64_t i = 0, below = 0, nc = *nc_io;
    for (; i + 64 <= n; i += 64) {
        uint64_t under_bits = 0, in_bits = 0;
        for (int j = 0; j < 8; ++j) {
            __m256i key = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(sc + i + 8 * j)), magnitude);
            key = _mm256_andnot_si256(_mm256_cmpgt_epi32(key, inf), key);  /* NaN ranks lowest */
            key = _mm256_add_epi32(key, _mm256_cmpeq_epi32(key, inf));     /* inf: the largest finite */
            if (with_grad) {                                                /* a non-finite gradient: the cap */
                __m256i g = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + i + 8 * j)), inf);
                key = _mm256_blendv_epi8(key, inf, _mm256_cmpeq_epi32(g, inf));
            }
            __m256i under = _mm256_cmpgt_epi32(vlo, key);
            __m256i inside = _mm256_andnot_si256(under, _mm256_cmpgt_epi32(vhi, key));
            under_bits |= (uint64_t)(uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(under)) << (8 * j);
            in_bits |= (uint64_t)(uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(inside)) << (8 * j);
        }
        bits[i >> 6] = under_bits;
        below += __builtin_popcountll(under_bits);
        for (; in_bits; in_bits &= in_bits - 1) {
            int j = __builtin_ctzll(in_bits);
            if (nc < cand_cap) { cand_key[nc] = score_key(sc[i + j], with_grad ? x[i + j] : 0u); cand_pos[nc] = i + j; }
            nc += 1;
        }
    }
    *below_io += below;
    *nc_io = nc;
    return i;
}
#endif

static inline __attribute__((always_inline)) void ema_scan(const source_t *src, int64_t excluded, uint32_t lo, uint32_t width, uint64_t *bits, uint32_t *cand_key,
                     int64_t *cand_pos, int64_t cand_cap, int64_t *below_io, int64_t *nc_io) {
    const uint32_t *x = (const uint32_t *)src->x, *sc = (const uint32_t *)src->s;
    const int64_t n = src->n;
    int64_t i = 0;
#if GMT_HAVE_AVX2_SCAN
    if (has_avx2()) i = ema_scan_avx2(x, sc, n, excluded != 0, lo, width, bits, cand_key, cand_pos, cand_cap, below_io, nc_io);
#endif
    int64_t below = 0, nc = *nc_io;
#define KEY_EMA(i) score_key(sc[i], 0u)
    if (excluded) {
        EMA_SCAN_BODY(KEY_SCORE)
    } else {
        EMA_SCAN_BODY(KEY_EMA)
    }
#undef KEY_EMA
    *below_io += below;
    *nc_io = nc;
}

/* The first digit d in [start, end) whose count, added to *cum, exceeds target (end if none);
 * *cum then holds the counts of the digits before d. Blocks of 64 digits whose sum keeps *cum at
 * or below target are skipped with one vectorised sum. */
static uint32_t digit_reaching(const uint32_t *hist, int tables, uint32_t start, uint32_t end, double target, int64_t *cum) {
    uint32_t d = start;
    while (d < end) {
        if (d + 64 <= end) {
            int64_t block = 0;
            for (int tb = 0; tb < tables; ++tb)
                for (uint32_t j = 0; j < 64; ++j) block += hist[((uint32_t)tb << 16) | (d + j)];
            if ((double)(*cum + block) <= target) { *cum += block; d += 64; continue; }
        }
        int64_t c = 0;
        for (int tb = 0; tb < tables; ++tb) c += hist[((uint32_t)tb << 16) | d];
        if ((double)(*cum + c) > target) return d;
        *cum += c;
        ++d;
    }
    return end;
}

/* sqrt without libm: a few Newton steps from above */
static double root(double v) {
    if (v <= 0) return 0;
    double r = v > 1 ? v : 1;
    for (int j = 0; j < 64; ++j) {
        double next = 0.5 * (r + v / r);
        if (next >= r) break;
        r = next;
    }
    return r;
}

/* Update the EMAs and rank the group. sample_shift 0: every key into the tables, the boundary bin
 * exact, the window that bin. Otherwise every 2**sample_shift-th key: the window is the bins holding
 * the sampled keys whose rank lies within EMA_SIGMAS standard deviations (plus two) of the k-th's
 * expected rank (outside it about once in 150,000 groups). Then the second read (ema_scan) and the k-th key selected among the window's keys, as
 * gmt_random_rank does: same buffers and outputs (out: threshold, ties, rankable, lo, hi). Returns
 * 0 when the k-th key lies outside the window (or the candidates overflow): the EMAs are updated
 * all the same, and the caller ranks them by gmt_rank_group. */
VECTOR_CLONES int32_t gmt_ema_rank(const source_t *src, int64_t count, float a, float b, const int32_t *first, double ratio,
                                   int64_t k, uint32_t sample_shift, uint32_t *hist, uint64_t *bits, const int64_t *word_offsets,
                                   uint32_t *cand_key, int64_t *cand_pos, int64_t *cand_start, int64_t cand_cap,
                                   int64_t *nonfinite, int64_t *out) {
    int64_t total = 0, excluded_all = 0, sampled = 0;
    for (int64_t t = 0; t < count; ++t) {
        total += src[t].n;
        sampled += (src[t].n + ((int64_t)1 << sample_shift) - 1) >> sample_shift;
    }
    int tables = sampled >= MANY_TABLES_FROM ? TABLES : 1;
    for (int64_t t = 0; t < count; ++t) {
        nonfinite[t] = ema_pass1(&src[t], a, b, first[t], hist, tables, sample_shift);
        excluded_all += nonfinite[t];
    }
    int64_t rankable = total - excluded_all;
    int64_t want = k < 0 ? (int64_t)(ratio * (double)rankable) : (k < rankable ? k : rankable);
    out[0] = -1; out[1] = 0; out[2] = rankable; out[3] = 0; out[4] = 0;
    const uint32_t cap_digit = EMA_CAP >> 16;
    uint32_t dlo = 0, dhi = 0;
    if (want > 0) {
        double from, to;
        if (sample_shift == 0) {
            from = (double)want - 0.5; to = (double)want - 0.5;
        } else {
            int64_t finite = sampled;  /* every excluded key is EMA_CAP, in the cap digit */
            for (int tb = 0; tb < tables; ++tb) finite -= hist[((uint32_t)tb << 16) | cap_digit];
            double q = (double)want / (double)rankable, r = q * (double)finite;
            double spread = EMA_SIGMAS * root((double)finite * q * (1.0 - q)) + 2.0;
            from = r - spread; to = r + spread;
        }
        /* dlo: the bin holding sampled rank `from` (0-based), dhi: the one holding `to` */
        int64_t cum = 0;
        uint32_t d = digit_reaching(hist, tables, 0, cap_digit, from, &cum);
        dlo = d < cap_digit ? d : cap_digit - 1;
        d = digit_reaching(hist, tables, d, cap_digit, to, &cum);
        dhi = d < cap_digit ? d : cap_digit - 1;
    }
    /* give the scratch back zeroed: by revisiting a small group's sampled keys, else wholesale */
    if (sampled < 4096 && tables == 1) {
        for (int64_t t = 0; t < count; ++t) clear_score(&src[t], hist);
    } else {
        for (int tb = 0; tb < tables; ++tb) memset(hist + ((size_t)tb << 16), 0, (TOP_DIGIT + 1) * sizeof(uint32_t));
    }
    if (want <= 0) return 1;
    uint32_t lo = dlo << 16, hi = (dhi + 1) << 16;
    if (hi > EMA_CAP) hi = EMA_CAP;
    out[3] = lo; out[4] = hi;
    int64_t below = 0, nc = 0;
    for (int64_t t = 0; t < count; ++t) {
        cand_start[t] = nc < cand_cap ? nc : cand_cap;
        ema_scan(&src[t], nonfinite[t], lo, hi - lo, bits + word_offsets[t], cand_key, cand_pos, cand_cap, &below, &nc);
    }
    cand_start[count] = nc < cand_cap ? nc : cand_cap;
    if (nc > cand_cap || want <= below || want > below + nc) return 0;
    int64_t remaining = want - below;
    uint32_t v = kth_in_window(cand_key, nc, remaining, lo, hi - lo, hist);
    int64_t less = 0, equal = 0;
    for (int64_t j = 0; j < nc; ++j) { less += cand_key[j] < v; equal += cand_key[j] == v; }
    remaining -= less;
    if (remaining == equal) { out[0] = (int64_t)v + 1; out[1] = 0; }
    else { out[0] = v; out[1] = remaining; }
    return 1;
}

/* gmt_ema_rank for many groups in one call (tensor scope: one group per tensor; global scope: one
 * group), so that a step's 272 tensors cost one call from Python and not 272, each with its own
 * buffers. Group g holds tensors [group_end[g-1], group_end[g]) (group_end[-1] = 0); a group of at
 * least sample_from entries samples every 2**sample_shift-th key (gmt_ema_rank), a smaller one counts
 * every key. Each ranked group's window keys follow the previous one's in cand_key/cand_pos
 * (cand_cap in all); cand_lo[t], cand_hi[t]: tensor t's range there. out, 6 per group: ranked (1, or
 * 0: the EMAs are updated all the same, rank them by gmt_rank_group), threshold (-1: mask nothing),
 * ties, rankable, lo, hi (the window, for gmt_apply_preselected). */
VECTOR_CLONES void gmt_ema_rank_groups(const source_t *src, float a, float b, const int32_t *first, const int64_t *group_end,
                                       int64_t ngroups, double ratio, int64_t k, int64_t sample_from, uint32_t sample_shift,
                                       uint32_t *hist, uint64_t *bits, const int64_t *word_offsets, uint32_t *cand_key,
                                       int64_t *cand_pos, int64_t *cand_lo, int64_t *cand_hi, int64_t cand_cap, int64_t *nonfinite,
                                       int64_t *out) {
    int64_t used = 0;
    for (int64_t gi = 0; gi < ngroups; ++gi) {
        const int64_t t0 = gi ? group_end[gi - 1] : 0, count = group_end[gi] - t0;
        int64_t *o = out + 6 * gi, total = 0, o5[5] = {0, 0, 0, 0, 0}, starts[count + 1];
        for (int64_t t = t0; t < t0 + count; ++t) total += src[t].n;
        memset(starts, 0, sizeof starts);  /* a group that masks nothing returns before its scan writes them */
        int32_t ranked = gmt_ema_rank(src + t0, count, a, b, first + t0, ratio, k, total >= sample_from ? sample_shift : 0u, hist,
                                      bits, word_offsets + t0, cand_key + used, cand_pos + used, starts, cand_cap - used,
                                      nonfinite + t0, o5);
        for (int64_t t = 0; t < count; ++t) { cand_lo[t0 + t] = used + starts[t]; cand_hi[t0 + t] = used + starts[t + 1]; }
        o[0] = ranked; o[1] = o5[0]; o[2] = o5[1]; o[3] = o5[2]; o[4] = o5[3]; o[5] = o5[4];
        if (ranked) used += starts[count];
    }
}
