/* EfficientNet-Lite2's stride-2 depthwise convolutions with TensorFlow "SAME" padding on channels-last maps,
 * fp32 or bf16, forward and backward: the `native-dw` fast path (model/fast/depthwise.py), built on
 * first use by model/fast/native.py and called through ctypes.
 *
 * x (B, H, W, C), y (B, Ho, Wo, C) with Ho = ceil(H / 2), Wo = ceil(W / 2); w (k, k, C) and the bias (C) fp32.
 * The padding is implicit: input row 2i − top + m feeds output row i through tap m, rows outside the map read
 * zero (top = (k − 2 + H % 2) / 2, as `same_pad`; columns likewise). Every sum is taken in fp32 and rounded to
 * bf16 once:
 *   y[b,i,j,c]  = bias[c] + Σ_mn w[m,n,c] x[b, 2i−top+m, 2j−left+n, c]
 *   dx[b,r,s,c] = Σ over the taps with r = 2i−top+m, s = 2j−left+n of w[m,n,c] g[b,i,j,c]
 *   dw[m,n,c]   = Σ_bij g[b,i,j,c] x[b, 2i−top+m, 2j−left+n, c],  dbias[c] = Σ_bij g[b,i,j,c]
 * Each pass loops over the channels innermost (contiguous here), which the compiler vectorises; the rows are
 * split over the threads (the weight sums each thread's own, added up after).
 *
 * Why: PyTorch pads the map (a copy, and a copy back in the backward) before oneDNN's convolution, whose bf16
 * input gradient at stride 2 runs several times slower than its fp32 one (README, "Training speed"). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "parallel.h"

typedef struct {
    Range rows; /* of all B·rows */
    const void *x;
    const float *w, *bias, *g; /* g: the output gradient, fp32 */
    void *out;                 /* forward: y; backward: dx */
    float *dw;                 /* every job's (k + 1, k, C) weight and bias sums, this job's at its index */
    int64_t B, H, W, C, k, top, left, Ho, Wo;
    int bf16;
} Job;

/* row += w · x[pixel], C channels; x bf16 or fp32. */
static inline void add_product(float *restrict row, const float *restrict w, const void *x, int64_t pixel,
                               int64_t C, int bf16) {
    if (bf16) {
        const uint16_t *restrict src = (const uint16_t *)x + pixel * C;
        for (int64_t c = 0; c < C; c++) row[c] += w[c] * from_bf16(src[c]);
    } else {
        const float *restrict src = (const float *)x + pixel * C;
        for (int64_t c = 0; c < C; c++) row[c] += w[c] * src[c];
    }
}

/* out[pixel] ← row, C channels. */
static inline void store(void *out, int64_t pixel, const float *restrict row, int64_t C, int bf16) {
    if (bf16) {
        uint16_t *restrict dst = (uint16_t *)out + pixel * C;
        for (int64_t c = 0; c < C; c++) dst[c] = to_bf16(row[c]);
    } else {
        memcpy((float *)out + pixel * C, row, (size_t)C * sizeof(float));
    }
}

/* For each tap t = m·k + n of output pixel (b, i, jj) that reads inside the map, input pixel
 * (2i − top + m, 2jj − left + n): acc[t·acc_step ..] += coef[t·coef_step ..] · that pixel of x, C channels.
 * The forward sums into one row with each tap's weights; the weight gradient into each tap's sums. */
static void over_taps(const Job *j, int64_t b, int64_t i, int64_t jj, float *acc, int64_t acc_step,
                      const float *coef, int64_t coef_step) {
    for (int64_t m = 0; m < j->k; m++) {
        const int64_t r = 2 * i - j->top + m;
        if (r < 0 || r >= j->H) continue;
        for (int64_t n = 0; n < j->k; n++) {
            const int64_t s = 2 * jj - j->left + n, t = m * j->k + n;
            if (s < 0 || s >= j->W) continue;
            add_product(acc + t * acc_step, coef + t * coef_step, j->x, (b * j->H + r) * j->W + s, j->C, j->bf16);
        }
    }
}

/* Output rows [begin, end) of B·Ho. */
static void *forward_job(void *arg) {
    const Job *j = (const Job *)arg;
    const int64_t C = j->C;
    float *row = malloc((size_t)C * sizeof(float));
    if (!row) return arg; /* non-NULL: failed */
    for (int64_t bi = j->rows.begin; bi < j->rows.end; bi++) {
        const int64_t b = bi / j->Ho, i = bi % j->Ho;
        for (int64_t jj = 0; jj < j->Wo; jj++) {
            for (int64_t c = 0; c < C; c++) row[c] = j->bias ? j->bias[c] : 0.0f;
            over_taps(j, b, i, jj, row, 0, j->w, C);
            store(j->out, bi * j->Wo + jj, row, C, j->bf16);
        }
    }
    free(row);
    return 0;
}

/* Input rows [begin, end) of B·H: each input pixel gathers the output gradients of the taps that read it. */
static void *input_grad_job(void *arg) {
    const Job *j = (const Job *)arg;
    const int64_t C = j->C, k = j->k;
    float *row = malloc((size_t)C * sizeof(float));
    if (!row) return arg;
    for (int64_t br = j->rows.begin; br < j->rows.end; br++) {
        const int64_t b = br / j->H, r = br % j->H;
        for (int64_t s = 0; s < j->W; s++) {
            for (int64_t c = 0; c < C; c++) row[c] = 0.0f;
            for (int64_t m = (r + j->top) % 2; m < k; m += 2) {
                const int64_t i = (r + j->top - m) / 2;
                if (r + j->top - m < 0 || i >= j->Ho) continue;
                for (int64_t n = (s + j->left) % 2; n < k; n += 2) {
                    const int64_t jj = (s + j->left - n) / 2;
                    if (s + j->left - n < 0 || jj >= j->Wo) continue;
                    const float *restrict w = j->w + (m * k + n) * C;
                    const float *restrict g = j->g + ((b * j->Ho + i) * j->Wo + jj) * C;
                    for (int64_t c = 0; c < C; c++) row[c] += w[c] * g[c];
                }
            }
            store(j->out, br * j->W + s, row, C, j->bf16);
        }
    }
    free(row);
    return 0;
}

/* Output rows [begin, end) of B·Ho: this job's weight and bias sums. */
static void *weight_grad_job(void *arg) {
    const Job *j = (const Job *)arg;
    const int64_t C = j->C, k = j->k;
    float *dw = j->dw + j->rows.index * (k * k + 1) * C, *dbias = dw + k * k * C;
    for (int64_t bi = j->rows.begin; bi < j->rows.end; bi++) {
        const int64_t b = bi / j->Ho, i = bi % j->Ho;
        for (int64_t jj = 0; jj < j->Wo; jj++) {
            const float *restrict g = j->g + (bi * j->Wo + jj) * C;
            for (int64_t c = 0; c < C; c++) dbias[c] += g[c];
            over_taps(j, b, i, jj, dw, C, g, 0);
        }
    }
    return 0;
}

/* y ← the convolution of x; bias may be NULL. Returns 0, or 1 when out of memory. */
int lgformer_dw2_forward(const void *x, const float *w, const float *bias, void *y, int64_t B, int64_t H,
                         int64_t W, int64_t C, int64_t k, int bf16, int threads) {
    const int64_t top = (k - 2 + H % 2) / 2, left = (k - 2 + W % 2) / 2, Ho = (H + 1) / 2, Wo = (W + 1) / 2;
    const Job base = {{0, 0, 0}, x, w, bias, 0, y, 0, B, H, W, C, k, top, left, Ho, Wo, bf16};
    Job jobs[MAX_THREADS];
    jobs[0] = base;
    return run_split(jobs, sizeof(Job), B * Ho, threads, forward_job);
}

/* From the output gradient g (B, Ho, Wo, C) fp32: dx (x's dtype), dw (k, k, C) and dbias (C) fp32, each
 * skipped when NULL. Returns 0, or 1 when out of memory. */
int lgformer_dw2_backward(const void *x, const float *w, const float *g, void *dx, float *dw, float *dbias,
                          int64_t B, int64_t H, int64_t W, int64_t C, int64_t k, int bf16, int threads) {
    const int64_t top = (k - 2 + H % 2) / 2, left = (k - 2 + W % 2) / 2, Ho = (H + 1) / 2, Wo = (W + 1) / 2;
    const Job base = {{0, 0, 0}, x, w, 0, g, dx, 0, B, H, W, C, k, top, left, Ho, Wo, bf16};
    Job jobs[MAX_THREADS];
    jobs[0] = base;
    int failed = dx ? run_split(jobs, sizeof(Job), B * H, threads, input_grad_job) : 0;
    if (!dw && !dbias) return failed;
    const int64_t per = (k * k + 1) * C;
    const int count = job_count(B * Ho, threads);
    float *sums = calloc((size_t)(count * per), sizeof(float));
    if (!sums) return 1;
    jobs[0].dw = sums;
    failed |= run_split(jobs, sizeof(Job), B * Ho, threads, weight_grad_job);
    add_up(sums, per, count);
    if (dw) memcpy(dw, sums, (size_t)(k * k * C) * sizeof(float));
    if (dbias) memcpy(dbias, sums + k * k * C, (size_t)C * sizeof(float));
    free(sums);
    return failed;
}
