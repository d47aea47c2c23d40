/* Whether the AVX2 paths run, decided once when the library loads: the CPU must have AVX2, and
 * GMT_PLUGINS_NO_AVX2_SCAN=1 in the environment at load time selects the portable twins instead (the
 * tests run both). */
#if GMT_HAVE_AVX2_SCAN
/* compress_lut[mask]: the lanes set in mask, in order, then zeros: a permutation that packs the
 * selected lanes of a vector to its front (scan_f32_avx2, rank_group.c) */
static uint32_t compress_lut[256][8];
static int avx2_state = 0;

/* Once, when the library loads (before any thread can call in): the permutation table, and whether
 * the CPU has AVX2 and the environment allows the AVX2 scan. */
__attribute__((constructor)) static void init_avx2_scan(void) {
    const char *off = getenv("GMT_PLUGINS_NO_AVX2_SCAN");
    __builtin_cpu_init();
    for (int mask = 0; mask < 256; ++mask) {
        int at = 0;
        for (int lane = 0; lane < 8; ++lane)
            if (mask & (1 << lane)) compress_lut[mask][at++] = (uint32_t)lane;
        for (; at < 8; ++at) compress_lut[mask][at] = 0;
    }
    avx2_state = (off == NULL || off[0] == '\0' || off[0] == '0') && __builtin_cpu_supports("avx2");
}

static inline int has_avx2(void) { return avx2_state; }
#endif

static inline int scan_vectorised(void) {
#if GMT_HAVE_AVX2_SCAN
    return has_avx2();
#else
    return 0;
#endif
}

/* For the tests: 1 when fp32 windows are scanned with AVX2 (and sampled). */
int32_t gmt_avx2_scan(void) { return scan_vectorised(); }
