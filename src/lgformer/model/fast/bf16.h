/* bf16 <-> fp32 for this folder's kernels (model/fast/native.py): a bf16 is the top half of an fp32. */
#ifndef LGFORMER_BF16_H
#define LGFORMER_BF16_H

#include <stdint.h>
#include <string.h>

static inline float from_bf16(uint16_t u) {
    const uint32_t bits = (uint32_t)u << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Round to nearest even; NaN kept NaN. */
static inline uint16_t to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    return f != f ? (uint16_t)0x7FC0u : (uint16_t)rounded;
}

/* row ← n bf16 elements from element i of a map, as fp32. */
static inline void load_row(const uint16_t *map, int64_t i, int64_t n, float *restrict row) {
    for (int64_t k = 0; k < n; k++) row[k] = from_bf16(map[i + k]);
}

#endif
