/* The deformable attention's sampler for CPUs, fp32: the `native-sampler` fast path of
 * model/deformable_attention.py, built on first use by model/fast/native.py and called through ctypes.
 *
 * What it computes is `grid_sample_attention`: per query, head, level and point, the bilinear sample
 * (zero padding, align_corners=False) of the head's value map at (x·W − 0.5, y·H − 0.5), weighted by the
 * attention weight and summed. Layouts, contiguous: value and its gradient head-major, (B, heads, S, dh) with
 * the levels' H·W pixels concatenated along S (each (batch, head) map one block: its random reads and writes
 * stay in few pages); the model's own for the rest: locations (B, Lq, heads, levels, points, 2) as (x, y) in
 * [0, 1], attention (B, Lq, heads, levels, points), output and its gradient (B, Lq, heads, dh).
 *
 * Why: PyTorch's CPU `grid_sampler_2d_backward` scatters channel by channel, four scalar adds per sample and
 * channel; here each sample adds a head's dh contiguous channels at once, and the value, location and
 * attention gradients come from one pass over its four neighbours. Work is split over the B·heads (batch,
 * head) maps, so no two threads write the same gradient row. Built with associative float math: sums over
 * channels are vectorised, in another order than a plain loop's (as PyTorch's own vectorised sums are). */
#include <math.h>
#include <stdint.h>

#include "parallel.h"

typedef struct {
    Range maps; /* the (batch, head) maps b·heads + h of this job */
    const float *value, *grad, *attn;
    const float *loc;           /* the locations as given, or NULL, and then made from: */
    const float *offsets, *ref; /* offsets (B, Lq, heads, K, 2) and reference points (B or 1, Lq, 2) */
    float *out, *grad_value;    /* grad_* may be NULL: that gradient is not wanted */
    float *grad_loc, *grad_attn, *grad_offsets;
    const int64_t *shapes; /* (levels, 2): H, W */
    const int64_t *starts; /* (levels): first pixel of each level along S */
    int64_t S, Lq, heads, dh, levels, points, ref_batch; /* ref_batch: 1 if ref has B rows, 0 if one */
} Job;

/* The locations (x, y) of the K = levels·points sampling points of query q's head h, qh = (b·Lq + q)·heads
 * + h: as given, or made as MSDeformAttn makes them, x = ref_x + offset_x / W_l and y = ref_y + offset_y /
 * H_l. */
static void locations_of(const Job *j, int64_t b, int64_t q, int64_t qh, float *x, float *y) {
    const int64_t K = j->levels * j->points;
    if (j->loc) {
        for (int64_t k = 0; k < K; k++) {
            x[k] = j->loc[2 * (qh * K + k)];
            y[k] = j->loc[2 * (qh * K + k) + 1];
        }
        return;
    }
    const float *offsets = j->offsets + 2 * qh * K, *ref = j->ref + 2 * (b * j->ref_batch * j->Lq + q);
    for (int64_t k = 0; k < K; k++) {
        const int64_t l = k / j->points;
        x[k] = ref[0] + offsets[2 * k] / (float)j->shapes[2 * l + 1];
        y[k] = ref[1] + offsets[2 * k + 1] / (float)j->shapes[2 * l];
    }
}

/* A sampling point on its level: its four neighbours' rows (top-left, top-right, bottom-left, bottom-right)
 * in the level's value map and in its gradient, and its bilinear fractions. */
typedef struct {
    const float *v[4];
    float *gv[4];
    float fx, fy;
} Point;

/* Locate (x, y) in [0, 1] on an H x W map of rows dh floats apart. Returns 1 for a point that reads the
 * map; 0 for one with every neighbour outside it (x̃ = x·W − 0.5 < −1 or ≥ W), which adds nothing and gets no
 * gradient; −1 for a NaN location, whose sample and gradients are NaN as `grid_sample`'s are (a diverged run
 * shows a NaN loss, not a silent zero). A neighbour outside the map reads `zeros` and writes its own row of
 * `trash` (dh floats each; `grad` may be NULL), so that the loops over channels take no branch and no two
 * written rows alias. */
static int locate(float x, float y, int64_t H, int64_t W, const float *map, float *grad,
                  const float *zeros, float *trash, int64_t dh, Point *p) {
    x = x * (float)W - 0.5f;
    y = y * (float)H - 0.5f;
    if (isnan(x) || isnan(y)) return -1;
    if (!(x >= -1.0f && x < (float)W && y >= -1.0f && y < (float)H)) return 0;
    const float xf = floorf(x), yf = floorf(y);
    p->fx = x - xf;
    p->fy = y - yf;
    for (int n = 0; n < 4; n++) {
        const int64_t xn = (int64_t)xf + (n & 1), yn = (int64_t)yf + (n >> 1);
        const int inside = xn >= 0 && xn < W && yn >= 0 && yn < H;
        p->v[n] = inside ? map + (yn * W + xn) * dh : zeros;
        p->gv[n] = inside && grad ? grad + (yn * W + xn) * dh : trash + n * dh;
    }
    return 1;
}

/* out += Σ s_n v_n over dh channels. */
static void add_sample(float *restrict out, const float *restrict v0, const float *restrict v1,
                       const float *restrict v2, const float *restrict v3, float s0, float s1, float s2,
                       float s3, int64_t dh) {
    for (int64_t i = 0; i < dh; i++) out[i] += s0 * v0[i] + s1 * v1[i] + s2 * v2[i] + s3 * v3[i];
}

/* One point's backward, with g its head's incoming gradient, a its attention weight and w_n its bilinear
 * weights: the value rows get a·w_n·g; returned through `d`: g·Σ w_n v_n (the sample: the attention weight's
 * gradient) and g·∂sample/∂x̃, g·∂sample/∂ỹ. */
static void point_backward(const float *restrict g, const float *restrict v0, const float *restrict v1,
                           const float *restrict v2, const float *restrict v3, float *restrict g0,
                           float *restrict g1, float *restrict g2, float *restrict g3, float fx, float fy,
                           float a, int64_t dh, float d[3]) {
    const float ex = 1 - fx, ey = 1 - fy, w0 = ex * ey, w1 = fx * ey, w2 = ex * fy, w3 = fx * fy;
    float sample = 0.0f, dx = 0.0f, dy = 0.0f;
    for (int64_t i = 0; i < dh; i++) {
        sample += g[i] * (w0 * v0[i] + w1 * v1[i] + w2 * v2[i] + w3 * v3[i]);
        dx += g[i] * (ey * (v1[i] - v0[i]) + fy * (v3[i] - v2[i]));
        dy += g[i] * (ex * (v2[i] - v0[i]) + fx * (v3[i] - v1[i]));
    }
    const float s0 = a * w0, s1 = a * w1, s2 = a * w2, s3 = a * w3;
    for (int64_t i = 0; i < dh; i++) {
        g0[i] += s0 * g[i];
        g1[i] += s1 * g[i];
        g2[i] += s2 * g[i];
        g3[i] += s3 * g[i];
    }
    d[0] = sample;
    d[1] = dx;
    d[2] = dy;
}

static void *forward_job(void *arg) {
    const Job *j = (const Job *)arg;
    const int64_t dh = j->dh, K = j->levels * j->points;
    float zeros[dh], trash[4 * dh];
    for (int64_t i = 0; i < dh; i++) zeros[i] = 0.0f;
    for (int64_t bh = j->maps.begin; bh < j->maps.end; bh++) {
        const int64_t b = bh / j->heads, h = bh % j->heads;
        const float *value = j->value + bh * j->S * dh;
        for (int64_t q = 0; q < j->Lq; q++) {
            const int64_t qh = (b * j->Lq + q) * j->heads + h;
            const float *attn = j->attn + qh * K;
            float x[K], y[K];
            locations_of(j, b, q, qh, x, y);
            float *out = j->out + qh * dh;
            for (int64_t i = 0; i < dh; i++) out[i] = 0.0f;
            for (int64_t l = 0, k = 0; l < j->levels; l++) {
                const int64_t H = j->shapes[2 * l], W = j->shapes[2 * l + 1];
                const float *map = value + j->starts[l] * dh;
                for (int64_t n = 0; n < j->points; n++, k++) {
                    Point p;
                    const int found = locate(x[k], y[k], H, W, map, 0, zeros, trash, dh, &p);
                    if (found < 0)
                        for (int64_t i = 0; i < dh; i++) out[i] = NAN;
                    if (found <= 0) continue;
                    const float a = attn[k], ex = 1 - p.fx, ey = 1 - p.fy;
                    add_sample(out, p.v[0], p.v[1], p.v[2], p.v[3], a * ex * ey, a * p.fx * ey, a * ex * p.fy,
                               a * p.fx * p.fy, dh);
                }
            }
        }
    }
    return 0;
}

/* The location's gradient is a·W·g·∂sample/∂x̃, a·H·g·∂sample/∂ỹ (x̃ = x·W − 0.5); the offset's that over W
 * (resp. H), a·g·∂sample/∂x̃. */
static void *backward_job(void *arg) {
    const Job *j = (const Job *)arg;
    const int64_t dh = j->dh, K = j->levels * j->points;
    float zeros[dh], trash[4 * dh];
    for (int64_t i = 0; i < dh; i++) zeros[i] = 0.0f;
    for (int64_t bh = j->maps.begin; bh < j->maps.end; bh++) {
        const int64_t b = bh / j->heads, h = bh % j->heads;
        const float *value = j->value + bh * j->S * dh;
        float *grad_value = j->grad_value ? j->grad_value + bh * j->S * dh : 0;
        for (int64_t q = 0; q < j->Lq; q++) {
            const int64_t qh = (b * j->Lq + q) * j->heads + h;
            const float *g = j->grad + qh * dh;
            const float *attn = j->attn + qh * K;
            float x[K], y[K], d[K][3];
            locations_of(j, b, q, qh, x, y);
            for (int64_t l = 0, k = 0; l < j->levels; l++) {
                const int64_t H = j->shapes[2 * l], W = j->shapes[2 * l + 1], start = j->starts[l] * dh;
                const float *map = value + start;
                float *grad_map = grad_value ? grad_value + start : 0;
                for (int64_t n = 0; n < j->points; n++, k++) {
                    Point p;
                    d[k][0] = d[k][1] = d[k][2] = 0.0f;
                    const int found = locate(x[k], y[k], H, W, map, grad_map, zeros, trash, dh, &p);
                    if (found < 0) d[k][0] = d[k][1] = d[k][2] = NAN;
                    if (found > 0)
                        point_backward(g, p.v[0], p.v[1], p.v[2], p.v[3], p.gv[0], p.gv[1], p.gv[2],
                                       p.gv[3], p.fx, p.fy, attn[k], dh, d[k]);
                }
            }
            for (int64_t k = 0; k < K; k++) {
                const int64_t l = k / j->points, i = qh * K + k;
                const float H = (float)j->shapes[2 * l], W = (float)j->shapes[2 * l + 1];
                if (j->grad_attn) j->grad_attn[i] = d[k][0];
                if (j->grad_loc) {
                    j->grad_loc[2 * i] = attn[k] * W * d[k][1];
                    j->grad_loc[2 * i + 1] = attn[k] * H * d[k][2];
                }
                if (j->grad_offsets) {
                    j->grad_offsets[2 * i] = attn[k] * d[k][1];
                    j->grad_offsets[2 * i + 1] = attn[k] * d[k][2];
                }
            }
        }
    }
    return 0;
}

/* The locations given (`loc`), or, with `loc` NULL, made from MSDeformAttn's raw offsets and its reference
 * points (`offsets`, `ref`; `ref_batch` 0 when one set of reference points serves the whole batch). */
void lgformer_sample_forward(const float *value, const float *loc, const float *attn, const float *offsets,
                             const float *ref, float *out, const int64_t *shapes, const int64_t *starts,
                             int64_t B, int64_t S, int64_t Lq, int64_t heads, int64_t dh, int64_t levels,
                             int64_t points, int64_t ref_batch, int threads) {
    Job jobs[MAX_THREADS];
    const Job job = {.value = value, .loc = loc, .attn = attn, .offsets = offsets, .ref = ref, .out = out,
                     .shapes = shapes, .starts = starts, .S = S, .Lq = Lq, .heads = heads, .dh = dh,
                     .levels = levels, .points = points, .ref_batch = ref_batch};
    jobs[0] = job;
    run_split(jobs, sizeof(Job), B * heads, threads, forward_job);
}

/* The locations as in the forward. grad_value must be zeroed by the caller (it is accumulated into); the
 * other gradients are written: grad_attn, and grad_loc for locations given or grad_offsets for locations made
 * (the reference points get none). */
void lgformer_sample_backward(const float *value, const float *loc, const float *attn, const float *offsets,
                              const float *ref, const float *grad, float *grad_value, float *grad_loc,
                              float *grad_attn, float *grad_offsets, const int64_t *shapes,
                              const int64_t *starts, int64_t B, int64_t S, int64_t Lq, int64_t heads,
                              int64_t dh, int64_t levels, int64_t points, int64_t ref_batch, int threads) {
    Job jobs[MAX_THREADS];
    const Job job = {.value = value, .grad = grad, .loc = loc, .attn = attn, .offsets = offsets, .ref = ref,
                     .grad_value = grad_value, .grad_loc = grad_loc, .grad_attn = grad_attn,
                     .grad_offsets = grad_offsets, .shapes = shapes, .starts = starts, .S = S, .Lq = Lq,
                     .heads = heads, .dh = dh, .levels = levels, .points = points, .ref_batch = ref_batch};
    jobs[0] = job;
    run_split(jobs, sizeof(Job), B * heads, threads, backward_job);
}
