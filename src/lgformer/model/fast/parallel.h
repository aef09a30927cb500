/* Running a C kernel's jobs on several threads; included by this folder's kernels (model/fast/native.py).
 *
 * Built with OpenMP (native.py tries that first), the jobs run on the OpenMP runtime PyTorch itself runs on:
 * the kernel asks for libgomp.so.1, and the loader binds it to the copy PyTorch has loaded, so the jobs go to
 * PyTorch's worker threads. Those spin for a while after each of PyTorch's parallel ops; threads of our own
 * would share the cores with them meanwhile, and a kernel ran several times slower inside a training step
 * than alone (README, "Training speed"). Without OpenMP the jobs run on POSIX threads of their own. */
#ifndef LGFORMER_PARALLEL_H
#define LGFORMER_PARALLEL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#ifndef _OPENMP
#include <pthread.h>
#endif

#define MAX_THREADS 256

/* The first member of every kernel's job: the items it takes, [begin, end), and its place among the jobs
 * (for sums of its own). */
typedef struct {
    int64_t begin, end;
    int index;
} Range;

/* How many jobs to split `items` into: `threads`, at most `items` and MAX_THREADS, at least 1. */
static inline int job_count(int64_t items, int threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > items) threads = (int)items;
    return threads < 1 ? 1 : threads;
}

/* pass(job) for the `count` jobs of `size` bytes each at `jobs`, each on a thread of its own (the first on
 * the calling thread); 0, or 1 if any pass returned non-NULL (failed). */
static inline int run_jobs(void *jobs, size_t size, int count, void *(*pass)(void *)) {
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads(count) schedule(static, 1) reduction(| : failed)
    for (int t = 0; t < count; t++) failed |= pass((char *)jobs + (size_t)t * size) != 0;
#else
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS];
    started[0] = 0;
    for (int t = 1; t < count; t++)
        started[t] = pthread_create(&ids[t], 0, pass, (char *)jobs + (size_t)t * size) == 0;
    for (int t = 0; t < count; t++)
        if (!started[t]) failed |= pass((char *)jobs + (size_t)t * size) != 0;
    for (int t = 1; t < count; t++) {
        void *result = 0;
        if (started[t]) pthread_join(ids[t], &result);
        failed |= result != 0;
    }
#endif
    return failed;
}

/* `items` split over job_count(items, threads) jobs made from jobs[0] (`size` bytes each, a Range first),
 * then run_jobs. */
static inline int run_split(void *jobs, size_t size, int64_t items, int threads, void *(*pass)(void *)) {
    const int count = job_count(items, threads);
    for (int t = 0; t < count; t++) {
        char *job = (char *)jobs + (size_t)t * size;
        if (t) memcpy(job, jobs, size);
        const Range range = {items * t / count, items * (t + 1) / count, t};
        memcpy(job, &range, sizeof range);
    }
    return run_jobs(jobs, size, count, pass);
}

/* The sums `count` jobs left in `sums`, `per` floats each, added up into the first job's. */
static inline void add_up(float *sums, int64_t per, int count) {
    for (int t = 1; t < count; t++)
        for (int64_t i = 0; i < per; i++) sums[i] += sums[t * per + i];
}

#endif
