/* Random keys hashed once (gmt_plugins/strategies/random.py, native_rank.random_rank_group and
 * apply_preselected).
 *
 * RandomKeys are uniform, so the k-th smallest key lies, with overwhelming probability, in a narrow
 * window [lo, lo + width) known before any key is seen (native_rank._window). One read per tensor
 * hashes every entry once and records, per entry, one bit: "finite and key < lo" (bits, one uint64
 * per 64 entries, each tensor starting on a word), the finite keys inside the window with their
 * positions (cand_key, cand_pos, in position order), the excluded (non-finite) count and the count
 * of bits set. The k-th key is then selected among the candidates, and the apply pass zeroes the
 * entries whose bit is set plus the candidates the cut takes (ties in position order), without
 * hashing again (gmt_apply_preselected, which serves gmt_ema_rank's selection too). When the k-th
 * key is not in the window (or the candidates overflow) gmt_random_rank returns 0 and the caller
 * ranks by the histogram passes (gmt_rank_group): same result, slower. The keys are bit for bit
 * those of KIND_RANDOM_* (and of RandomKeys.keys, the torch twin). */

/* mix64(p) = mix64_tail(p * GOLDEN), and (p + j) * GOLDEN = p * GOLDEN + j * GOLDEN: a block of 64
 * positions takes one multiply and a table of j * GOLDEN instead of 64 (vectorised 64-bit multiplies
 * are emulated on AVX2, so this halves the hash). The top 33 bits of mix64 are those of its tail
 * before the last xor-shift, which leaves them unchanged. */
#define GOLDEN 0x9E3779B97F4A7C15ull
static inline uint64_t mix64_tail(uint64_t x) {
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    return (x ^ (x >> 27)) * 0x94D049BB133111EBull;
}

/* 64 flags (bytes 0/1) packed into one word, bit j = flag j: one multiply per 8 flags */
static inline uint64_t pack_flags64(const uint8_t *f) {
    uint64_t w = 0;
    for (int j = 0; j < 8; ++j) {
        uint64_t v;
        memcpy(&v, f + 8 * j, 8);
        w |= ((v * 0x0102040810204080ull) >> 56) << (8 * j);
    }
    return w;
}

#define RANDOM_SCAN_BODY(T, E)                                                                      \
    {                                                                                               \
        const T *x = (const T *)s->x;                                                               \
        const T e = (T)(E);                                                                         \
        for (; i + 64 <= n; i += 64) {                                                              \
            uint8_t f[64], in[64];                                                                  \
            uint32_t k[64], bb = 0, ee = 0;                                                         \
            const uint64_t base = (p0 + (uint64_t)i) * GOLDEN;                                      \
            for (int j = 0; j < 64; ++j) {                                                          \
                uint32_t bad = (x[i + j] & e) == e;                                                 \
                uint32_t key = (uint32_t)(mix64_tail(base + golden_steps[j]) >> 33);                \
                key = bad ? RANDOM_CAP : key;                                                       \
                k[j] = key;                                                                         \
                f[j] = (uint8_t)(key < lo);                                                         \
                in[j] = (uint8_t)(key - lo < width);                                                \
                bb += key < lo;                                                                     \
                ee += bad;                                                                          \
            }                                                                                       \
            bits[i >> 6] = pack_flags64(f);                                                         \
            below += bb;                                                                            \
            excluded += ee;                                                                         \
            /* the window's keys, visited by their bits: usually none, rarely more than one */      \
            for (uint64_t win = pack_flags64(in); win; win &= win - 1) {                            \
                int j = __builtin_ctzll(win);                                                       \
                if (nc < cand_cap) { cand_key[nc] = k[j]; cand_pos[nc] = i + j; }                   \
                nc += 1;                                                                            \
            }                                                                                       \
        }                                                                                           \
        uint64_t w = 0;                                                                             \
        for (; i < n; ++i) {                                                                        \
            uint32_t bad = (x[i] & e) == e;                                                         \
            uint32_t key = bad ? RANDOM_CAP : (uint32_t)(mix64(p0 + (uint64_t)i) >> 33);            \
            w |= (uint64_t)(key < lo) << (i & 63);                                                  \
            below += key < lo;                                                                      \
            excluded += bad;                                                                        \
            if (key - lo < width) {                                                                 \
                if (nc < cand_cap) { cand_key[nc] = key; cand_pos[nc] = i; }                        \
                nc += 1;                                                                            \
            }                                                                                       \
        }                                                                                           \
        if (n & 63) bits[n >> 6] = w;                                                               \
    }

/* one tensor: adds to *below_io and *nc_io, returns its excluded count */
static inline __attribute__((always_inline)) int64_t random_scan_one(const source_t *s, uint32_t lo, uint32_t width, uint64_t *bits,
                                      uint32_t *cand_key, int64_t *cand_pos, int64_t cand_cap,
                                      int64_t *below_io, int64_t *nc_io) {
    const int64_t n = s->n;
    const uint64_t p0 = (uint64_t)s->start + s->seed;
    int64_t i = 0, below = 0, excluded = 0, nc = *nc_io;
    uint64_t golden_steps[64];
    for (int j = 0; j < 64; ++j) golden_steps[j] = (uint64_t)j * GOLDEN;
    switch (s->kind) {
    case KIND_RANDOM_32: RANDOM_SCAN_BODY(uint32_t, 0x7F800000u) break;
    case KIND_RANDOM_16: RANDOM_SCAN_BODY(uint16_t, (s->flags & SOURCE_FP16) ? 0x7C00u : 0x7F80u) break;
    case KIND_RANDOM_64: RANDOM_SCAN_BODY(uint64_t, 0x7FF0000000000000ull) break;
    default: break;
    }
    *below_io += below;
    *nc_io = nc;
    return excluded;
}

/* The r-th smallest (1-based) of keys a[0..n), all in [lo, lo + width): radix passes of up to 12
 * bits over them (at most three, each a count into hist, which is lent zeroed and given back so,
 * and a scan of at most 4096 bins); no branch on the keys' order, unlike a quickselect. */
#define SELECT_BITS 12
static uint32_t kth_in_window(const uint32_t *a, int64_t n, int64_t r, uint32_t lo, uint32_t width, uint32_t *hist) {
    const int bits = width > 1 ? 32 - __builtin_clz(width - 1) : 1;
    uint32_t prefix = 0;
    for (int known = 0; known < bits;) {
        int take = bits - known < SELECT_BITS ? bits - known : SELECT_BITS;
        int shift = bits - known - take;
        uint32_t mask = (1u << take) - 1u;
        for (int64_t j = 0; j < n; ++j) {
            uint32_t v = a[j] - lo;
            /* (v >> shift) >> take, in two steps: shift + take may be 32 */
            if (((v >> shift) >> take) == prefix) hist[(v >> shift) & mask] += 1;
        }
        uint32_t bin = 0;
        int64_t under = 0;
        for (; bin < mask; ++bin) {
            if (under + hist[bin] >= r) break;
            under += hist[bin];
        }
        r -= under;
        memset(hist, 0, (size_t)(mask + 1) * sizeof(uint32_t));
        prefix = (prefix << take) | bin;
        known += take;
    }
    return lo + prefix;
}

/* Rank a group of random sources (tensor scope: one; global: all) with their keys hashed once.
 * bits: for tensor t, ceil(n_t / 64) words from word_offsets[t]. cand_key/cand_pos: cand_cap slots;
 * cand_start[t] receives where tensor t's candidates begin (cand_start[count] = their total);
 * hist: 4096 zeroed uint32 (returned zeroed). ratio/k as gmt_rank_group. out: threshold (-1 = mask nothing), ties,
 * rankable. Returns 1 when ranked, 0 when the caller must rank by histograms. */
VECTOR_CLONES int32_t gmt_random_rank(const source_t *src, int64_t count, double ratio, int64_t k, uint32_t lo, uint32_t width,
                                      uint64_t *bits, const int64_t *word_offsets, uint32_t *cand_key, int64_t *cand_pos,
                                      int64_t *cand_start, int64_t cand_cap, uint32_t *hist, int64_t *nonfinite,
                                      int64_t *out) {
    int64_t below = 0, nc = 0, total = 0, excluded_all = 0;
    for (int64_t t = 0; t < count; ++t) {
        cand_start[t] = nc < cand_cap ? nc : cand_cap;
        nonfinite[t] = random_scan_one(&src[t], lo, width, bits + word_offsets[t], cand_key, cand_pos, cand_cap, &below, &nc);
        excluded_all += nonfinite[t];
        total += src[t].n;
    }
    cand_start[count] = nc < cand_cap ? nc : cand_cap;
    int64_t rankable = total - excluded_all;
    int64_t want = k < 0 ? (int64_t)(ratio * (double)rankable) : (k < rankable ? k : rankable);
    out[0] = -1; out[1] = 0; out[2] = rankable;
    if (want <= 0) return 1;
    if (nc > cand_cap || want <= below || want > below + nc) return 0;
    int64_t remaining = want - below;
    uint32_t v = kth_in_window(cand_key, nc, remaining, lo, width, hist);
    int64_t less = 0, equal = 0;
    for (int64_t j = 0; j < nc; ++j) { less += cand_key[j] < v; equal += cand_key[j] == v; }
    remaining -= less;
    if (remaining == equal) { out[0] = (int64_t)v + 1; out[1] = 0; }
    else { out[0] = v; out[1] = remaining; }
    return 1;
}

/* Zero, in place, what a cut of gmt_random_rank takes from one of its tensors: the entries whose bit
 * is set, then the candidates (cand_key/cand_pos, nc of them, position order) below threshold and
 * the first `ties` equal to it. threshold must lie in [lo, lo + width] (the caller checks). record
 * (or NULL) receives the mask as bytes. out: masked count, ties used, and how many masked entries
 * were nonzero before (gmt_apply's masked_nonzero; -0.0 counts as zero); energy (or NULL): as
 * gmt_apply_energy's, the tensor then masked in blocks of ENERGY_BLOCK entries (each block's bits,
 * then its candidates, in position order as without energy). */
/* Entries lo..hi (lo a multiple of 64): their bits, then the candidates from c on that lie below hi */
#define RANDOM_APPLY_RANGE(T, lo, hi)                                                               \
    {                                                                                               \
        T *y = (T *)s->x;                                                                           \
        const T magnitude = (T)((T)~(T)0 >> 1); /* every bit but the sign: -0.0 counts as zero */  \
        int64_t i = (lo);                                                                           \
        for (; i + 64 <= (hi); i += 64) {                                                           \
            uint64_t w = bits[i >> 6];                                                              \
            uint32_t w0 = (uint32_t)w, w1 = (uint32_t)(w >> 32), nz = 0;                            \
            for (int j = 0; j < 32; ++j) {                                                          \
                uint32_t hit = (w0 >> j) & 1u;                                                      \
                nz += hit & (uint32_t)((y[i + j] & magnitude) != 0);                                \
                y[i + j] &= (T)((T)hit - 1u);                                                       \
            }                                                                                       \
            for (int j = 0; j < 32; ++j) {                                                          \
                uint32_t hit = (w1 >> j) & 1u;                                                      \
                nz += hit & (uint32_t)((y[i + 32 + j] & magnitude) != 0);                           \
                y[i + 32 + j] &= (T)((T)hit - 1u);                                                  \
            }                                                                                       \
            masked += __builtin_popcountll(w);                                                      \
            nonzero += nz;                                                                          \
        }                                                                                           \
        if (i < (hi)) {                                                                             \
            uint64_t w = bits[i >> 6];                                                              \
            for (; i < (hi); ++i) {                                                                 \
                uint32_t hit = (uint32_t)((w >> (i & 63)) & 1u);                                    \
                nonzero += hit & (uint32_t)((y[i] & magnitude) != 0);                               \
                y[i] &= (T)((T)hit - 1u);                                                           \
                masked += hit;                                                                      \
            }                                                                                       \
        }                                                                                           \
        for (; c < nc && cand_pos[c] < (hi); ++c) {                                                 \
            uint32_t key = cand_key[c];                                                             \
            int tie = (key == threshold) & (ties > 0);                                              \
            if ((key < threshold) | tie) {                                                          \
                nonzero += (y[cand_pos[c]] & magnitude) != 0;                                       \
                y[cand_pos[c]] = 0;                                                                 \
                masked += 1;                                                                        \
                ties -= tie;                                                                        \
                used += tie;                                                                        \
                if (record) record[cand_pos[c]] = 1;                                                \
            }                                                                                       \
        }                                                                                           \
    }
#define RANDOM_APPLY_BODY(T)                                                                        \
    if (energy == NULL) {                                                                           \
        RANDOM_APPLY_RANGE(T, 0, n)                                                                 \
    } else {                                                                                        \
        for (int64_t b = 0; b < n; b += ENERGY_BLOCK) {                                             \
            const int64_t e = n - b < ENERGY_BLOCK ? n - b : ENERGY_BLOCK;                          \
            before += energy_sum((const T *)s->x + b, value, e);                                    \
            RANDOM_APPLY_RANGE(T, b, b + e)                                                         \
            after += energy_sum((const T *)s->x + b, value, e);                                     \
        }                                                                                           \
    }

VECTOR_CLONES void gmt_apply_preselected(const source_t *s, const uint64_t *bits, const uint32_t *cand_key, const int64_t *cand_pos,
                                    int64_t nc, uint32_t threshold, int64_t ties, uint8_t *record, int64_t *out,
                                    double *energy) {
    const int64_t n = s->n;
    const int32_t value = energy_value_kind(s);
    int64_t masked = 0, used = 0, nonzero = 0, c = 0;
    double before = 0.0, after = 0.0;
    if (record)
        for (int64_t i = 0; i < n; ++i) record[i] = (uint8_t)((bits[i >> 6] >> (i & 63)) & 1u);
    switch (s->kind) {
    case KIND_RANDOM_32: RANDOM_APPLY_BODY(uint32_t) break;
    case KIND_RANDOM_16: RANDOM_APPLY_BODY(uint16_t) break;
    case KIND_RANDOM_64: RANDOM_APPLY_BODY(uint64_t) break;
    case KIND_SCORE: RANDOM_APPLY_BODY(uint32_t) break;   /* gmt_ema_rank's selection */
    default: break;
    }
    out[0] = masked;
    out[1] = used;
    out[2] = nonzero;
    if (energy) { energy[0] += before; energy[1] += after; }
}
