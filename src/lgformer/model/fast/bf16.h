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

/* row ← n elements from element i of a map, bf16 when `bf16` else fp32, as fp32. */
static inline void load_row(const void *map, int64_t i, int64_t n, int bf16, float *restrict row) {
    if (bf16) {
        const uint16_t *restrict src = (const uint16_t *)map + i;
        for (int64_t k = 0; k < n; k++) row[k] = from_bf16(src[k]);
    } else {
        memcpy(row, (const float *)map + i, (size_t)n * sizeof(float));
    }
}

#endif
