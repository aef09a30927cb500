/* AdamW on fp32 master weights from bf16 gradients, writing the bf16 weights the next step computes with: the
 * `bf16-weights` fast path (model/fast/adamw.py), built on first use by model/fast/native.py and called through
 * ctypes.
 *
 * For each element, with g = grad · coef (coef: gradient clipping's factor, else 1):
 *   p ← p · (1 − lr·wd);  m ← m + (1 − β1)·(g − m);  v ← v·β2 + (1 − β2)·g·g
 *   p ← p − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + ε);  w ← bf16(p)
 * PyTorch's fused AdamW (`torch.optim.AdamW(fused=True)`) on the same operands, in its order of operations;
 * w is what bf16 autocast's cast of p would give. One pass: the tensors are taken as one run of elements,
 * split evenly over the threads.
 *
 * Why: under bf16 autocast every step casts each weight to bf16 and its bf16 gradient back to fp32, two
 * passes over the weights that this one folds into the update (README, "Training speed"). */
#include <math.h>
#include <stdint.h>

/* PyTorch's order of operations and its two FMAs (as its CPU build of torch 2.13 rounds), no other contraction
 * nor reassociation (the build's flags would allow both): the master weights match its fused AdamW's bit for
 * bit. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off", "no-associative-math")
#endif

#include "bf16.h"
#include "parallel.h"

typedef struct {
    float decay, neg_step, bias2_sqrt; /* 1 − lr·wd;  −lr / (1 − β1^t);  √(1 − β2^t) */
} Scalars;

typedef struct {
    Range elements; /* over all tensors, one after another */
    float **param, **exp_avg, **exp_avg_sq;
    const uint16_t **grad;
    uint16_t **weight;
    const int64_t *sizes;
    const Scalars *scalars;
    int tensors;
    float lerp, beta2, sq, eps, coef; /* 1 − β1, β2, 1 − β2, ε, clipping's factor */
} Job;

static void update(float *restrict p, float *restrict m, float *restrict v, const uint16_t *restrict g16,
                   uint16_t *restrict w, int64_t n, Scalars s, const Job *j) {
    const float lerp = j->lerp, beta2 = j->beta2, sq = j->sq;
    for (int64_t i = 0; i < n; i++) {
        const float g = from_bf16(g16[i]) * j->coef;
        const float mi = fmaf(lerp, g - m[i], m[i]);
        const float vi = fmaf(sq * g, g, v[i] * beta2);
        const float decayed = p[i] * s.decay;
        const float pi = decayed + s.neg_step * mi / (sqrtf(vi) / s.bias2_sqrt + j->eps);
        m[i] = mi;
        v[i] = vi;
        p[i] = pi;
        w[i] = to_bf16(pi);
    }
}

static void *elements_job(void *arg) {
    const Job *j = (const Job *)arg;
    int64_t start = 0;
    for (int t = 0; t < j->tensors && start < j->elements.end; start += j->sizes[t], t++) {
        const int64_t lo = j->elements.begin > start ? j->elements.begin - start : 0;
        const int64_t hi = j->elements.end - start < j->sizes[t] ? j->elements.end - start : j->sizes[t];
        if (hi > lo)
            update(j->param[t] + lo, j->exp_avg[t] + lo, j->exp_avg_sq[t] + lo, j->grad[t] + lo,
                   j->weight[t] + lo, hi - lo, j->scalars[t], j);
    }
    return 0;
}

/* `tensors` tensors of sizes[t] elements each: param, exp_avg, exp_avg_sq fp32 and updated in place; grad bf16;
 * weight bf16, written; `scalars` (tensors, 3) fp32, a Scalars per tensor; lerp = 1 − β1 and sq = 1 − β2 as
 * PyTorch rounds them (in double, then to fp32). Returns 0. */
int lgformer_adamw_bf16(float **param, float **exp_avg, float **exp_avg_sq, const uint16_t **grad,
                        uint16_t **weight, const int64_t *sizes, const float *scalars, int64_t total,
                        int tensors, int threads, float lerp, float beta2, float sq, float eps, float coef) {
    Job jobs[MAX_THREADS];
    const Job base = {{0, 0, 0}, param, exp_avg, exp_avg_sq, grad, weight, sizes, (const Scalars *)scalars,
                      tensors, lerp, beta2, sq, eps, coef};
    jobs[0] = base;
    return run_split(jobs, sizeof(Job), total, threads, elements_job);
}
