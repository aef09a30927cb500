/* The backward of LayerNorm over the last axis of a bf16 input: the `native-layernorm` fast path
 * (model/fast/layernorm.py), built on first use by model/fast/native.py and called through ctypes.
 *
 * For a row of D elements with the forward's mean μ and reciprocal standard deviation σ, x̂ = (x − μ)·σ and
 * h = γ·dy (dy where there is no γ):
 *   dx = σ · (h − mean(h) − x̂ · mean(h · x̂)),  dγ = Σ_rows dy · x̂,  dβ = Σ_rows dy
 * PyTorch's formulas, summed in fp32 and rounded to bf16 once. One pass over each row (it stays in cache
 * between its two sums and dx); the rows are split over the threads, each summing its own dγ and dβ, added
 * up after.
 *
 * Why: PyTorch's CPU LayerNorm backward on bf16 inputs is slower than this, most on short rows, and sums the
 * weight and bias gradients in bf16 (README, "Training speed"). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "parallel.h"

typedef struct {
    Range rows;
    const uint16_t *x, *dy;
    const float *mean, *rstd, *gamma;
    uint16_t *dx; /* or NULL: not wanted */
    float *sums;  /* every job's Σ dy·x̂ and Σ dy, (2, D) each, this job's at its index */
    int64_t D;
} Job;

static void *rows_job(void *arg) {
    const Job *j = (const Job *)arg;
    const int64_t D = j->D;
    float *xh = malloc((size_t)(2 * D) * sizeof(float)), *h = xh ? xh + D : 0;
    if (!xh) return arg; /* non-NULL: failed */
    float *restrict dgamma = j->sums + j->rows.index * 2 * D, *restrict dbeta = dgamma + D;
    for (int64_t r = j->rows.begin; r < j->rows.end; r++) {
        const float mu = j->mean[r], sigma = j->rstd[r];
        load_row(j->x, r * D, D, xh);
        load_row(j->dy, r * D, D, h);
        float a = 0.0f, b = 0.0f;
        for (int64_t d = 0; d < D; d++) {
            xh[d] = (xh[d] - mu) * sigma;
            dgamma[d] += h[d] * xh[d];
            dbeta[d] += h[d];
            if (j->gamma) h[d] *= j->gamma[d];
            a += h[d];
            b += h[d] * xh[d];
        }
        a /= (float)D;
        b /= (float)D;
        if (!j->dx) continue;
        uint16_t *restrict dst = j->dx + r * D;
        for (int64_t d = 0; d < D; d++) dst[d] = to_bf16(sigma * (h[d] - a - xh[d] * b));
    }
    free(xh);
    return 0;
}

/* x, dy, dx (N, D) contiguous bf16; mean, rstd (N) fp32; gamma (D) fp32 or NULL. Writes dx, dgamma and
 * dbeta (D, fp32), each where not NULL. Returns 0, or 1 when out of memory (outputs then undefined). */
int lgformer_layernorm_backward(const uint16_t *x, const uint16_t *dy, const float *mean, const float *rstd,
                                const float *gamma, uint16_t *dx, float *dgamma, float *dbeta, int64_t N,
                                int64_t D, int threads) {
    const int count = job_count(N, threads);
    float *sums = calloc((size_t)(count * 2 * D), sizeof(float));
    if (!sums) return 1;
    Job jobs[MAX_THREADS];
    const Job base = {{0, 0, 0}, x, dy, mean, rstd, gamma, dx, sums, D};
    jobs[0] = base;
    const int failed = run_split(jobs, sizeof(Job), N, threads, rows_job);
    add_up(sums, 2 * D, count);
    if (dgamma) memcpy(dgamma, sums, (size_t)D * sizeof(float));
    if (dbeta) memcpy(dbeta, sums + D, (size_t)D * sizeof(float));
    free(sums);
    return failed;
}
