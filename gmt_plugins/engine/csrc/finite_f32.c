/* One-read passes over fp32 tensors that leave their non-finite entries out: gmt_momentum's EMA
 * update, the non-finite count, the gradient sums of the stored-mask strategies (spiel, sift, spt)
 * and score keys (strategies/_sparse.py).
 *
 * gmt_momentum's EMA in place, as its torch twin computes it: where the gradient is finite,
 * ema = fl(fl(a * ema) + fl(b * g)) with a = (float)beta, b = (float)(1 - beta); elsewhere ema stays.
 * With first != 0 it is the first step: ema = g where finite, else +0. fp32 throughout, built with
 * -ffp-contract=off so that no product is fused into an fma (torch rounds each product). */
VECTOR_CLONES void gmt_ema_f32(float *ema, const float *g, int64_t n, float a, float b, int32_t first) {
    const uint32_t *gb = (const uint32_t *)g;
    if (first) {
        for (int64_t i = 0; i < n; ++i) ema[i] = (gb[i] & 0x7F800000u) == 0x7F800000u ? 0.0f : g[i];
        return;
    }
    for (int64_t i = 0; i < n; ++i) {
        float p = a * ema[i];
        float q = b * g[i];
        float next = p + q;
        ema[i] = (gb[i] & 0x7F800000u) == 0x7F800000u ? ema[i] : next;
    }
}

/* NaN and inf entries of an fp32 tensor (count_nonfinite's twin), in one vectorised read. */
VECTOR_CLONES int64_t gmt_count_nonfinite_f32(const uint32_t *x, int64_t n) {
    int64_t total = 0;
    for (int64_t i = 0; i < n; ++i) total += (x[i] & 0x7F800000u) == 0x7F800000u;
    return total;
}

/* Accumulate the finite entries of an fp32 gradient into an fp32 sum, in place: v = g where g is
 * finite, else +0; v = v * v when square != 0; acc = v when first != 0, else acc = acc + v. Each
 * operation rounds as its torch twin's does (nan_to_num, square_, add_; -ffp-contract=off keeps
 * acc + v * v unfused): one read of g and one read and write of acc, no scratch tensor. */
#define ACCUMULATE_LOOP(VALUE, STORE)                                                               \
    for (int64_t i = 0; i < n; ++i) {                                                               \
        const float v = (gb[i] & 0x7F800000u) == 0x7F800000u ? 0.0f : g[i];                        \
        const float w = (VALUE);                                                                    \
        acc[i] = (STORE);                                                                           \
    }
VECTOR_CLONES void gmt_accumulate_finite_f32(float *restrict acc, const float *restrict g, int64_t n, int32_t first,
                                             int32_t square) {
    const uint32_t *gb = (const uint32_t *)g;
    if (first && square) { ACCUMULATE_LOOP(v * v, w) }
    else if (first) { ACCUMULATE_LOOP(v, w) }
    else if (square) { ACCUMULATE_LOOP(v * v, acc[i] + w) }
    else { ACCUMULATE_LOOP(v, acc[i] + w) }
}
#undef ACCUMULATE_LOOP

/* The keys of ScoreKeys(largest, excluded) over float32 scores, written out as float32 scores that
 * rank smallest first with nothing excluded (strategies/_sparse.py key_scores, reference_key_scores
 * its torch twin): bits of |s|, or 0x7F7FFFFF minus them with largest; +inf (the excluded key) where
 * s is not finite or excluded[i] (bytes, or NULL) is set. */
VECTOR_CLONES void gmt_score_keys_f32(const uint32_t *restrict s, const uint8_t *restrict excluded, int64_t n,
                                      int32_t largest, uint32_t *restrict out) {
    const uint32_t flip = largest ? 0x7F7FFFFFu : 0u;
    for (int64_t i = 0; i < n; ++i) {
        const uint32_t bits = s[i] & 0x7FFFFFFFu;
        const uint32_t key = largest ? flip - bits : bits;
        const int rankable = (bits < 0x7F800000u) & (excluded ? excluded[i] == 0 : 1);
        out[i] = rankable ? key : 0x7F800000u;
    }
}
