/* The backward of GroupNorm on bf16 channels-last maps: the `native-groupnorm` fast path of the
 * pixel decoder's GroupNorms (model/fast/groupnorm.py), built on first use by model/fast/native.py and called
 * through ctypes.
 *
 * y = γ_c · x̂ + β_c with x̂ = (x − μ_ng) · σ_ng over each sample n and group g of D = C/G channels, M = HW·D
 * elements (σ: the forward's reciprocal standard deviation). With dy the output gradient and, per (n, g),
 * a = Σ γ_c dy and b = Σ γ_c dy x over the group:
 *   dx = σ γ_c dy − k x + (k μ − σ a / M),  k = σ³ (b − μ a) / M
 *   dγ_c = Σ_n σ_ng (Σ_hw dy x − μ_ng Σ_hw dy),  dβ_c = Σ_n Σ_hw dy
 * Two passes over the maps, each a loop over the channels (contiguous in channels-last memory) that the
 * compiler vectorises: the per-channel sums Σ_hw dy and Σ_hw dy x, then dx, rounded to bf16 once. The pixels
 * are split over the threads; each sums its own pixels, then the sums are added up.
 *
 * Why: PyTorch's CPU GroupNorm backward on bf16 channels-last maps runs several times slower than on fp32
 * ones (README, "Training speed"). */
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"
#include "parallel.h"

typedef struct {
    Range pixels; /* this job's pixels of every sample */
    const uint16_t *x, *dy;
    uint16_t *dx;
    float *sums;         /* pass 1: every job's Σ dy, Σ dy·x, (N, C) each, this job's at its index */
    const float *coeffs; /* pass 2: per (n, c) the factors of dy, of x, and the constant, (3, N, C) */
    int64_t N, C, HW;
} Job;

static void *sum_pass(void *arg) {
    const Job *j = (const Job *)arg;
    const int64_t C = j->C;
    float *x = malloc((size_t)(2 * C) * sizeof(float)), *dy = x ? x + C : 0;
    if (!x) return arg; /* non-NULL: failed */
    float *sums = j->sums + j->pixels.index * 2 * j->N * C;
    for (int64_t n = 0; n < j->N; n++) {
        float *restrict s1 = sums + n * C, *restrict s2 = sums + (j->N + n) * C;
        for (int64_t c = 0; c < C; c++) s1[c] = s2[c] = 0.0f;
        for (int64_t i = j->pixels.begin; i < j->pixels.end; i++) {
            load_row(j->x, (n * j->HW + i) * C, C, x);
            load_row(j->dy, (n * j->HW + i) * C, C, dy);
            for (int64_t c = 0; c < C; c++) {
                s1[c] += dy[c];
                s2[c] += dy[c] * x[c];
            }
        }
    }
    free(x);
    return 0;
}

static void *dx_pass(void *arg) {
    const Job *j = (const Job *)arg;
    const int64_t C = j->C;
    float *x = malloc((size_t)(3 * C) * sizeof(float)), *dy = x ? x + C : 0, *out = x ? x + 2 * C : 0;
    if (!x) return arg;
    for (int64_t n = 0; n < j->N; n++) {
        const float *restrict a = j->coeffs + n * C, *restrict b = j->coeffs + (j->N + n) * C;
        const float *restrict k = j->coeffs + (2 * j->N + n) * C;
        for (int64_t i = j->pixels.begin; i < j->pixels.end; i++) {
            const int64_t at = (n * j->HW + i) * C;
            load_row(j->x, at, C, x);
            load_row(j->dy, at, C, dy);
            uint16_t *restrict dst = j->dx + at;
            for (int64_t c = 0; c < C; c++) out[c] = a[c] * dy[c] + b[c] * x[c] + k[c];
            for (int64_t c = 0; c < C; c++) dst[c] = to_bf16(out[c]);
        }
    }
    free(x);
    return 0;
}

/* x, dy, dx (N, HW, C) channels-last bf16; mean, rstd (N, G); gamma (C) fp32 or NULL (γ = 1). Writes dx (if
 * not NULL), dgamma and dbeta (C, fp32, if not NULL). Returns 0, or 1 when out of memory (outputs then
 * undefined). */
int lgformer_groupnorm_backward(const uint16_t *x, const uint16_t *dy, const float *mean, const float *rstd,
                                const float *gamma, uint16_t *dx, float *dgamma, float *dbeta, int64_t N,
                                int64_t C, int64_t HW, int64_t G, int threads) {
    const int64_t D = C / G, per = 2 * N * C;
    const int count = job_count(HW, threads);
    float *sums = calloc((size_t)(count * per + 3 * N * C), sizeof(float));
    if (!sums) return 1;
    float *coeffs = sums + count * per;
    Job jobs[MAX_THREADS];
    const Job base = {{0, 0, 0}, x, dy, dx, sums, coeffs, N, C, HW};
    jobs[0] = base;
    int failed = run_split(jobs, sizeof(Job), HW, threads, sum_pass);
    add_up(sums, per, count);
    const float *s1 = sums, *s2 = sums + N * C; /* Σ_hw dy, Σ_hw dy·x per (n, c) */
    for (int64_t c = 0; c < C; c++) {
        float dg = 0.0f, db = 0.0f;
        for (int64_t n = 0; n < N; n++) {
            const int64_t ng = n * G + c / D;
            dg += rstd[ng] * (s2[n * C + c] - mean[ng] * s1[n * C + c]);
            db += s1[n * C + c];
        }
        if (dgamma) dgamma[c] = dg;
        if (dbeta) dbeta[c] = db;
    }
    for (int64_t n = 0; dx && n < N; n++) {
        for (int64_t g = 0; g < G; g++) {
            float a = 0.0f, b = 0.0f;
            for (int64_t c = g * D; c < (g + 1) * D; c++) {
                const float scale = gamma ? gamma[c] : 1.0f;
                a += scale * s1[n * C + c];
                b += scale * s2[n * C + c];
            }
            const float mu = mean[n * G + g], r = rstd[n * G + g], M = (float)(HW * D);
            const float k = r * r * r * (b - mu * a) / M;
            for (int64_t c = g * D; c < (g + 1) * D; c++) {
                coeffs[n * C + c] = r * (gamma ? gamma[c] : 1.0f);
                coeffs[(N + n) * C + c] = -k;
                coeffs[(2 * N + n) * C + c] = k * mu - r * a / M;
            }
        }
    }
    if (dx) failed |= run_split(jobs, sizeof(Job), HW, threads, dx_pass);
    free(sums);
    return failed;
}
