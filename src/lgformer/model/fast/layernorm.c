/* The backward of LayerNorm over the last axis, fp32 or bf16: the `native-layernorm` fast path
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
    const void *x, *dy;
    const float *mean, *rstd, *gamma;
    void *dx;
    float *sums; /* this job's Σ dy·x̂ and Σ dy, (2, D) */
    int64_t D, begin, end; /* rows [begin, end) */
    int bf16;
} Job;

static void *rows_job(void *arg) {
    const Job *j = (const Job *)arg;
    const int64_t D = j->D;
    float *xh = malloc((size_t)(2 * D) * sizeof(float)), *h = xh ? xh + D : 0;
    if (!xh) return arg; /* non-NULL: failed */
    float *restrict dgamma = j->sums, *restrict dbeta = j->sums + D;
    for (int64_t r = j->begin; r < j->end; r++) {
        const float mu = j->mean[r], sigma = j->rstd[r];
        load_row(j->x, r * D, D, j->bf16, xh);
        load_row(j->dy, r * D, D, j->bf16, h);
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
        if (j->bf16) {
            uint16_t *restrict dst = (uint16_t *)j->dx + r * D;
            for (int64_t d = 0; d < D; d++) dst[d] = to_bf16(sigma * (h[d] - a - xh[d] * b));
        } else {
            float *restrict dst = (float *)j->dx + r * D;
            for (int64_t d = 0; d < D; d++) dst[d] = sigma * (h[d] - a - xh[d] * b);
        }
    }
    free(xh);
    return 0;
}

/* x, dy, dx (N, D) contiguous, bf16 when `bf16` else fp32; mean, rstd (N) fp32; gamma (D) fp32 or NULL.
 * Writes dx, and dgamma and dbeta (D, fp32) where not NULL. Returns 0, or 1 when out of memory (outputs
 * then undefined). */
int lgformer_layernorm_backward(const void *x, const void *dy, const float *mean, const float *rstd,
                                const float *gamma, void *dx, float *dgamma, float *dbeta, int64_t N, int64_t D,
                                int bf16, int threads) {
    threads = job_count(N, threads);
    float *sums = calloc((size_t)(threads * 2 * D), sizeof(float));
    if (!sums) return 1;
    Job jobs[MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        const Job j = {x, dy, mean, rstd, gamma, dx, sums + t * 2 * D, D, N * t / threads, N * (t + 1) / threads,
                       bf16};
        jobs[t] = j;
    }
    const int failed = run_jobs(jobs, sizeof(Job), threads, rows_job);
    for (int t = 1; t < threads; t++)
        for (int64_t d = 0; d < 2 * D; d++) sums[d] += sums[t * 2 * D + d];
    if (dgamma) memcpy(dgamma, sums, (size_t)D * sizeof(float));
    if (dbeta) memcpy(dbeta, sums + D, (size_t)D * sizeof(float));
    free(sums);
    return failed;
}
