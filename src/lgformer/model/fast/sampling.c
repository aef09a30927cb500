/* The deformable attention's sampler for CPUs, fp32: the `native-sampler` fast path of
 * model/deformable_attention.py, built on first use by model/fast/native.py and called through ctypes.
 *
 * What it computes is `grid_sample_attention`: per query, head, level and point, the bilinear sample
 * (zero padding, align_corners=False) of the head's value map at (x·W − 0.5, y·H − 0.5), weighted by the
 * attention weight and summed. Layouts are the model's own, contiguous: value (B, S, heads, dh) with the
 * levels' H·W pixels concatenated along S; locations (B, Lq, heads, levels, points, 2) as (x, y) in [0, 1];
 * attention (B, Lq, heads, levels, points); output and its gradient (B, Lq, heads, dh).
 *
 * Why: PyTorch's CPU `grid_sampler_2d_backward` scatters channel by channel, four scalar adds per sample and
 * channel; here each sample adds a head's dh contiguous channels at once, and the value, location and
 * attention gradients come from one pass over its four neighbours. Work is split over the B·heads (batch,
 * head) maps, so no two threads write the same gradient row. Built with associative float math: sums over
 * channels are vectorised, in another order than a plain loop's (as PyTorch's own vectorised sums are). */
#include <math.h>
#include <pthread.h>
#include <stdint.h>

#define MAX_THREADS 256

typedef struct {
    const float *value, *loc, *attn, *grad;
    float *out, *grad_value, *grad_loc, *grad_attn; /* grad_* may be NULL: that gradient is not wanted */
    const int64_t *shapes;                          /* (levels, 2): H, W */
    const int64_t *starts;                          /* (levels): first pixel of each level along S */
    int64_t S, Lq, heads, dh, levels, points;
    int64_t begin, end; /* the (batch, head) maps b·heads + h of this job */
} Job;

/* A sampling point at (x, y) in [0, 1] on an H x W map: its top-left neighbour and bilinear fractions.
 * `corner` returns 1 for a point that reads the map, 0 for one with every neighbour outside it (x̃ < −1 or
 * x̃ ≥ W): it adds nothing and gets no gradient, and −1 for a NaN location, which makes its sample and
 * gradients NaN as `grid_sample` does (a diverged run shows a NaN loss instead of a silent zero). */
typedef struct {
    int64_t x0, y0;
    float fx, fy;
} Corner;

static int corner(float x, float y, int64_t H, int64_t W, Corner *c) {
    x = x * (float)W - 0.5f;
    y = y * (float)H - 0.5f;
    if (isnan(x) || isnan(y)) return -1;
    if (!(x >= -1.0f && x < (float)W && y >= -1.0f && y < (float)H)) return 0;
    const float xf = floorf(x), yf = floorf(y);
    c->x0 = (int64_t)xf;
    c->y0 = (int64_t)yf;
    c->fx = x - xf;
    c->fy = y - yf;
    return 1;
}

/* Rows of the four neighbours (top-left, top-right, bottom-left, bottom-right) in `map` and, where `grad` is
 * not NULL, in its gradient; a neighbour outside the map reads `zeros` and writes `trash` (dh floats each),
 * so that the loops over channels below take no branch. */
static void neighbours(const Corner *c, int64_t H, int64_t W, int64_t row, const float *map, float *grad,
                       const float *zeros, float *trash, const float *v[4], float *gv[4]) {
    for (int n = 0; n < 4; n++) {
        const int64_t x = c->x0 + (n & 1), y = c->y0 + (n >> 1);
        const int inside = x >= 0 && x < W && y >= 0 && y < H;
        v[n] = inside ? map + (y * W + x) * row : zeros;
        gv[n] = inside && grad ? grad + (y * W + x) * row : trash;
    }
}

static void forward_job(const Job *j) {
    const int64_t dh = j->dh, K = j->levels * j->points, row = j->heads * dh;
    float zeros[dh], trash[dh];
    for (int64_t i = 0; i < dh; i++) zeros[i] = 0.0f;
    for (int64_t bh = j->begin; bh < j->end; bh++) {
        const int64_t b = bh / j->heads, h = bh % j->heads;
        const float *value = j->value + b * j->S * row + h * dh;
        for (int64_t q = 0; q < j->Lq; q++) {
            const int64_t qh = (b * j->Lq + q) * j->heads + h;
            float *out = j->out + qh * dh;
            for (int64_t i = 0; i < dh; i++) out[i] = 0.0f;
            for (int64_t k = 0; k < K; k++) {
                const int64_t l = k / j->points, H = j->shapes[2 * l], W = j->shapes[2 * l + 1];
                Corner c;
                const int at = corner(j->loc[2 * (qh * K + k)], j->loc[2 * (qh * K + k) + 1], H, W, &c);
                if (at < 0)
                    for (int64_t i = 0; i < dh; i++) out[i] = NAN;
                if (at <= 0) continue;
                const float *v[4];
                float *unused[4];
                neighbours(&c, H, W, row, value + j->starts[l] * row, 0, zeros, trash, v, unused);
                const float a = j->attn[qh * K + k], ex = 1 - c.fx, ey = 1 - c.fy;
                const float s0 = a * ex * ey, s1 = a * c.fx * ey, s2 = a * ex * c.fy, s3 = a * c.fx * c.fy;
                for (int64_t i = 0; i < dh; i++)
                    out[i] += s0 * v[0][i] + s1 * v[1][i] + s2 * v[2][i] + s3 * v[3][i];
            }
        }
    }
}

/* With g the incoming gradient of the point's head, a its attention weight and w_n its bilinear weights: the
 * value rows get a·w_n·g, the attention weight g·Σ w_n v_n (the sample), the location a·W·g·∂sample/∂x̃ and
 * a·H·g·∂sample/∂ỹ (x̃ = x·W − 0.5). */
static void backward_job(const Job *j) {
    const int64_t dh = j->dh, K = j->levels * j->points, row = j->heads * dh;
    float zeros[dh], trash[dh];
    for (int64_t i = 0; i < dh; i++) zeros[i] = 0.0f;
    for (int64_t bh = j->begin; bh < j->end; bh++) {
        const int64_t b = bh / j->heads, h = bh % j->heads;
        const float *value = j->value + b * j->S * row + h * dh;
        float *grad_value = j->grad_value ? j->grad_value + b * j->S * row + h * dh : 0;
        for (int64_t q = 0; q < j->Lq; q++) {
            const int64_t qh = (b * j->Lq + q) * j->heads + h;
            const float *g = j->grad + qh * dh;
            for (int64_t k = 0; k < K; k++) {
                const int64_t l = k / j->points, H = j->shapes[2 * l], W = j->shapes[2 * l + 1];
                const float a = j->attn[qh * K + k];
                float ga = 0.0f, gx = 0.0f, gy = 0.0f;
                Corner c;
                const int at = corner(j->loc[2 * (qh * K + k)], j->loc[2 * (qh * K + k) + 1], H, W, &c);
                if (at < 0) ga = gx = gy = NAN;
                if (at > 0) {
                    const float *v[4];
                    float *gv[4];
                    const int64_t start = j->starts[l] * row;
                    float *grad_map = grad_value ? grad_value + start : 0;
                    neighbours(&c, H, W, row, value + start, grad_map, zeros, trash, v, gv);
                    const float fx = c.fx, fy = c.fy, ex = 1 - fx, ey = 1 - fy;
                    const float w0 = ex * ey, w1 = fx * ey, w2 = ex * fy, w3 = fx * fy;
                    for (int64_t i = 0; i < dh; i++) {
                        const float sample = w0 * v[0][i] + w1 * v[1][i] + w2 * v[2][i] + w3 * v[3][i];
                        const float dx = ey * (v[1][i] - v[0][i]) + fy * (v[3][i] - v[2][i]);
                        const float dy = ex * (v[2][i] - v[0][i]) + fx * (v[3][i] - v[1][i]);
                        ga += g[i] * sample;
                        gx += g[i] * dx;
                        gy += g[i] * dy;
                    }
                    const float s0 = a * w0, s1 = a * w1, s2 = a * w2, s3 = a * w3;
                    for (int64_t i = 0; i < dh; i++) {
                        gv[0][i] += s0 * g[i];
                        gv[1][i] += s1 * g[i];
                        gv[2][i] += s2 * g[i];
                        gv[3][i] += s3 * g[i];
                    }
                }
                if (j->grad_attn) j->grad_attn[qh * K + k] = ga;
                if (j->grad_loc) {
                    j->grad_loc[2 * (qh * K + k)] = a * (float)W * gx;
                    j->grad_loc[2 * (qh * K + k) + 1] = a * (float)H * gy;
                }
            }
        }
    }
}

static void *forward_thread(void *job) {
    forward_job((const Job *)job);
    return 0;
}

static void *backward_thread(void *job) {
    backward_job((const Job *)job);
    return 0;
}

/* Split `base` over `threads` jobs of about equal (batch, head) maps; jobs a thread cannot be made for run in
 * the calling thread. */
static void run(Job base, int64_t maps, int threads, void *(*thread)(void *)) {
    Job jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS];
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > maps) threads = (int)maps;
    if (threads < 1) threads = 1;
    for (int t = 0; t < threads; t++) {
        jobs[t] = base;
        jobs[t].begin = maps * t / threads;
        jobs[t].end = maps * (t + 1) / threads;
        started[t] = t > 0 && pthread_create(&ids[t], 0, thread, &jobs[t]) == 0;
    }
    for (int t = 0; t < threads; t++)
        if (!started[t]) thread(&jobs[t]);
    for (int t = 1; t < threads; t++)
        if (started[t]) pthread_join(ids[t], 0);
}

void lgformer_sample_forward(const float *value, const float *loc, const float *attn, float *out,
                             const int64_t *shapes, const int64_t *starts, int64_t B, int64_t S, int64_t Lq,
                             int64_t heads, int64_t dh, int64_t levels, int64_t points, int threads) {
    Job job = {value, loc, attn, 0, out, 0, 0, 0, shapes, starts, S, Lq, heads, dh, levels, points, 0, 0};
    run(job, B * heads, threads, forward_thread);
}

/* grad_value must be zeroed by the caller (it is accumulated into); grad_loc and grad_attn are written. */
void lgformer_sample_backward(const float *value, const float *loc, const float *attn, const float *grad,
                              float *grad_value, float *grad_loc, float *grad_attn, const int64_t *shapes,
                              const int64_t *starts, int64_t B, int64_t S, int64_t Lq, int64_t heads,
                              int64_t dh, int64_t levels, int64_t points, int threads) {
    Job job = {value, loc, attn, grad, 0, grad_value, grad_loc, grad_attn, shapes, starts,
               S, Lq, heads, dh, levels, points, 0, 0};
    run(job, B * heads, threads, backward_thread);
}
