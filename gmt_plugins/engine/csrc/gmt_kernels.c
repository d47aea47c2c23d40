/* The compiled CPU kernels of gmt_plugins, built as one translation unit: every file below is
 * included once, in this order (a file may use the static helpers of those before it), so that the
 * library is one compiler run and every helper can be inlined into both clones of its callers
 * (VECTOR_CLONES in gmt.h). Build: cc -O3 -ffp-contract=off -shared -fPIC gmt_kernels.c
 * (gmt_plugins/engine/cpu/loader.py). */
#include "gmt.h"

#include "cpu_features.c"    /* whether the AVX2 paths run (gmt_avx2_scan) */
#include "digit_histogram.c" /* per-pass digit histograms of magnitude keys (gmt_hist_*) */
#include "masked_moves.c"    /* strict mode's copy-out and write-back (gmt_gather_masked_*, gmt_scatter_masked_*) */
#include "key_passes.c"      /* the per-kind passes that ranking a group is made of */
#include "rank_group.c"      /* a group ranked in one call (gmt_rank_group) */
#include "energy.c"          /* the sums of g^2 an apply takes for energy_kept (energy_sum) */
#include "apply.c"           /* one tensor masked by a cut (gmt_apply, gmt_apply_energy) */
#include "finite_f32.c"      /* fp32 passes: EMA, non-finite count, gradient sums, score keys */
#include "random_rank.c"     /* random keys hashed once (gmt_random_rank, gmt_apply_preselected) */
#include "ema_rank.c"        /* the EMA update fused with its ranking (gmt_ema_rank, gmt_ema_rank_groups) */
#include "id3_grow.c"        /* id3's growth step (gmt_id3_grow) */
#include "coverage.c"        /* coverage bit sets (gmt_coverage_observe, gmt_apply_tracked) */
#include "mask_bits.c"       /* stored masks as bits (gmt_pack_mask_bits, gmt_apply_mask_bits) */
