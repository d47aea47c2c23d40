/* The gradient's energy as the apply passes see it (gmt_apply, gmt_apply_tracked,
 * gmt_apply_preselected, gmt_apply_mask_bits): the sum of g^2 over the finite entries of a block,
 * and over those of them the apply masks, each added to a double accumulator (energy_t).
 *
 * An apply first writes its block's hits (0/1 bytes, the block being at most 4096 entries and in L1
 * cache), then the block's energy is taken here from the values before they are zeroed, then the
 * block is masked: the gradient is read from memory once. Each entry's square is exact in double
 * (fp32, bf16 and fp16 values carry at most 24 significant bits; fp64 squares round once); the
 * squares go to 8 lanes (entry j of a block to lane j % 8) written as vectors, so that the sums
 * vectorise without reassociating anything, and each block's lanes are added up in one fixed order:
 * a given tensor and cut give the same sums on every run and in both clones (VECTOR_CLONES).
 * Non-finite entries (never masked) count in neither sum. The torch twin is
 * gmt_plugins/engine/reference.py apply_cut. */

typedef struct {
    double all;    /* sum of g^2 over the finite entries */
    double masked; /* sum of g^2 over the masked entries (always finite) */
} energy_t;

typedef double energy_v4d __attribute__((vector_size(32)));
typedef int64_t energy_v4l __attribute__((vector_size(32)));
typedef float energy_v4f __attribute__((vector_size(16)));
typedef int32_t energy_v4i __attribute__((vector_size(16)));
typedef uint32_t energy_v4u __attribute__((vector_size(16)));
typedef uint16_t energy_v4s __attribute__((vector_size(8)));
typedef uint8_t energy_v4b __attribute__((vector_size(4)));

/* What kind of number a source's gradient holds, for its energy */
enum { VALUE_F32 = 0, VALUE_BF16 = 1, VALUE_F16 = 2, VALUE_F64 = 3 };

static inline int32_t energy_value_kind(const source_t *src) {
    switch (src->kind) {
    case KIND_BF16_WIDE: return VALUE_BF16;
    case KIND_16: case KIND_RANDOM_16: return src->s ? VALUE_F16 : VALUE_BF16; /* s non-NULL: fp16 (signatures.py) */
    case KIND_RANDOM_64: return VALUE_F64;
    default: return VALUE_F32;
    }
}

/* fp16 bits -> fp32 bits, exact (subnormals normalised; inf and NaN keep an all-ones exponent) */
static inline uint32_t energy_half_bits(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
    if (exponent == 0x1Fu) return sign | 0x7F800000u | (mantissa << 13);
    if (exponent != 0) return sign | ((exponent + 112u) << 23) | (mantissa << 13);
    if (mantissa == 0) return sign;
    uint32_t e = 113u, m = mantissa; /* subnormal: shift the leading 1 to the implicit bit */
    while (!(m & 0x400u)) { m <<= 1; e -= 1; }
    return sign | (e << 23) | ((m & 0x3FFu) << 13);
}

/* the lanes of four fp32 values (as bits) whose hits are hit (0/1 bytes) */
static inline void energy_add4_f32(energy_v4u bits, energy_v4b hit, energy_v4d *all, energy_v4d *masked) {
    const energy_v4l finite = __builtin_convertvector((bits & 0x7F800000u) != 0x7F800000u, energy_v4l);
    const energy_v4l taken = -__builtin_convertvector(hit, energy_v4l);
    energy_v4d d = __builtin_convertvector((energy_v4f)bits, energy_v4d);
    d = (energy_v4d)((energy_v4l)(d * d) & finite);
    *all += d;
    *masked += (energy_v4d)((energy_v4l)d & taken);
}

static inline void energy_add4_f64(const energy_v4l *value, energy_v4b hit, energy_v4d *all, energy_v4d *masked) {
    const energy_v4l bits = *value; /* by address: a 32-byte vector argument draws a note from GCC on ABI history */
    const energy_v4l finite = (bits & 0x7FF0000000000000ll) != 0x7FF0000000000000ll;
    const energy_v4l taken = -__builtin_convertvector(hit, energy_v4l);
    energy_v4d d = (energy_v4d)bits;
    d = (energy_v4d)((energy_v4l)(d * d) & finite);
    *all += d;
    *masked += (energy_v4d)((energy_v4l)d & taken);
}

static inline double energy_lanes_sum(const energy_v4d *a, const energy_v4d *b) {
    return (((*a)[0] + (*b)[0]) + ((*a)[1] + (*b)[1])) + (((*a)[2] + (*b)[2]) + ((*a)[3] + (*b)[3]));
}

/* Adds to e the energy of the n (<= 4096) entries of x (values of `value` kind) and of those whose
 * hit byte is 1. */
static inline __attribute__((always_inline)) void energy_block(const void *x, int32_t value, const uint8_t *hit, int64_t n,
                                                              energy_t *e) {
    energy_v4d all0 = {0, 0, 0, 0}, all1 = all0, masked0 = all0, masked1 = all0;
    int64_t j = 0;
    switch (value) {
    case VALUE_F32: {
        const uint32_t *v = (const uint32_t *)x;
        for (; j + 8 <= n; j += 8) {
            energy_v4u a, b;
            energy_v4b ha, hb;
            memcpy(&a, v + j, 16); memcpy(&b, v + j + 4, 16);
            memcpy(&ha, hit + j, 4); memcpy(&hb, hit + j + 4, 4);
            energy_add4_f32(a, ha, &all0, &masked0);
            energy_add4_f32(b, hb, &all1, &masked1);
        }
        break; }
    case VALUE_BF16: {
        const uint16_t *v = (const uint16_t *)x;
        for (; j + 8 <= n; j += 8) {
            energy_v4s a, b;
            energy_v4b ha, hb;
            memcpy(&a, v + j, 8); memcpy(&b, v + j + 4, 8);
            memcpy(&ha, hit + j, 4); memcpy(&hb, hit + j + 4, 4);
            energy_add4_f32(__builtin_convertvector(a, energy_v4u) << 16, ha, &all0, &masked0);
            energy_add4_f32(__builtin_convertvector(b, energy_v4u) << 16, hb, &all1, &masked1);
        }
        break; }
    case VALUE_F16: {
        const uint16_t *v = (const uint16_t *)x;
        for (; j + 8 <= n; j += 8) {
            energy_v4u a, b;
            energy_v4b ha, hb;
            for (int l = 0; l < 4; ++l) { a[l] = energy_half_bits(v[j + l]); b[l] = energy_half_bits(v[j + 4 + l]); }
            memcpy(&ha, hit + j, 4); memcpy(&hb, hit + j + 4, 4);
            energy_add4_f32(a, ha, &all0, &masked0);
            energy_add4_f32(b, hb, &all1, &masked1);
        }
        break; }
    default: {
        const uint64_t *v = (const uint64_t *)x;
        for (; j + 8 <= n; j += 8) {
            energy_v4l a, b;
            energy_v4b ha, hb;
            memcpy(&a, v + j, 32); memcpy(&b, v + j + 4, 32);
            memcpy(&ha, hit + j, 4); memcpy(&hb, hit + j + 4, 4);
            energy_add4_f64(&a, ha, &all0, &masked0);
            energy_add4_f64(&b, hb, &all1, &masked1);
        }
        break; }
    }
    if (j < n) { /* the last (up to 7) entries, padded with zeros that add nothing */
        uint8_t hits[8] = {0};
        memcpy(hits, hit + j, (size_t)(n - j));
        energy_v4b ha, hb;
        memcpy(&ha, hits, 4); memcpy(&hb, hits + 4, 4);
        if (value == VALUE_F64) {
            uint64_t pad[8] = {0};
            memcpy(pad, (const uint64_t *)x + j, (size_t)(n - j) * 8);
            energy_v4l a, b;
            memcpy(&a, pad, 32); memcpy(&b, pad + 4, 32);
            energy_add4_f64(&a, ha, &all0, &masked0);
            energy_add4_f64(&b, hb, &all1, &masked1);
        } else {
            uint32_t pad[8] = {0};
            for (int64_t l = 0; l < n - j; ++l) {
                if (value == VALUE_F32) pad[l] = ((const uint32_t *)x)[j + l];
                else if (value == VALUE_BF16) pad[l] = (uint32_t)((const uint16_t *)x)[j + l] << 16;
                else pad[l] = energy_half_bits(((const uint16_t *)x)[j + l]);
            }
            energy_v4u a, b;
            memcpy(&a, pad, 16); memcpy(&b, pad + 4, 16);
            energy_add4_f32(a, ha, &all0, &masked0);
            energy_add4_f32(b, hb, &all1, &masked1);
        }
    }
    e->all += energy_lanes_sum(&all0, &all1);
    e->masked += energy_lanes_sum(&masked0, &masked1);
}

/* One masked entry's square (the candidates that gmt_apply_preselected takes after its blocks) */
static inline double energy_one(const void *x, int32_t value, int64_t i) {
    double v;
    switch (value) {
    case VALUE_F32: { float f; memcpy(&f, (const uint32_t *)x + i, 4); v = f; break; }
    case VALUE_BF16: { uint32_t b = (uint32_t)((const uint16_t *)x)[i] << 16; float f; memcpy(&f, &b, 4); v = f; break; }
    case VALUE_F16: { uint32_t b = energy_half_bits(((const uint16_t *)x)[i]); float f; memcpy(&f, &b, 4); v = f; break; }
    default: memcpy(&v, (const uint64_t *)x + i, 8); break;
    }
    return v * v;
}

/* 64 hit bits -> 64 hit bytes (entry j at bit j) */
static inline void energy_unpack64(uint64_t w, uint8_t *set) {
    for (int j = 0; j < 8; ++j) {
        /* byte k of the product holds bit k of the byte when set (at most 0x80): adding 0x7F carries it to bit 7 */
        uint64_t spread = (((w >> (8 * j)) & 0xFFu) * 0x0101010101010101ULL) & 0x8040201008040201ULL;
        spread = ((spread + 0x7F7F7F7F7F7F7F7FULL) >> 7) & 0x0101010101010101ULL;
        memcpy(set + 8 * j, &spread, 8);
    }
}
