/* The kernel threads: how many, and the CPUs they are pinned to, one thread per CPU.
 *
 * Every op runs on one OpenMP team (libgomp keeps its pool threads and hands team member i
 * to pool thread i again, so a worker pinned once stays pinned). Workers are pinned for
 * good; the calling thread, which is the application's own (Python's main thread), is
 * pinned only while a compiled step runs and gets its own CPU set back afterwards, so
 * threads the application starts later do not inherit a one-CPU mask. */
#define _GNU_SOURCE
#include <sched.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "pxl_kernels.h"

#define MAX_BOUND 1024
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* (Linux 5.14; older headers lack the name) */
#endif

static int n_threads;
uint64_t pxl_entries = 1; /* (a thread's record of 0 means "nothing loaded") */
static int bound[MAX_BOUND], n_bound; /* thread i runs on bound[i % n_bound] */

int pxl_num_threads(void) {
#ifdef _OPENMP
    if (n_threads <= 0) n_threads = omp_get_max_threads();
    return n_threads;
#else
    return 1;
#endif
}
void pxl_set_num_threads(int n) { n_threads = n; }

static int pin_self(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

int pxl_bind_threads(const int *cpus, int n) {
    if (n <= 0 || n > MAX_BOUND) return -1;
    for (int i = 0; i < n; i++) {
        if (cpus[i] < 0 || cpus[i] >= CPU_SETSIZE) return -1;
        bound[i] = cpus[i];
    }
    n_bound = n;
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(pxl_num_threads()) reduction(+ : failed)
    if (omp_get_thread_num() > 0) failed += pin_self(bound[omp_get_thread_num() % n_bound]) != 0;
#endif
    return failed;
}

int pxl_pin_caller(pxl_cpu_mask *saved) {
    if (!n_bound) return 0;
    cpu_set_t *old = (cpu_set_t *)saved->bits;
    _Static_assert(sizeof saved->bits >= sizeof(cpu_set_t), "pxl_cpu_mask holds a cpu_set_t");
    if (pthread_getaffinity_np(pthread_self(), sizeof *old, old) != 0) return 0;
    return pin_self(bound[0]) == 0;
}

void pxl_unpin_caller(const pxl_cpu_mask *saved) {
    pthread_setaffinity_np(pthread_self(), sizeof(cpu_set_t), (const cpu_set_t *)saved->bits);
}

/* Commit zero-filled memory [p, p + bytes) now, each thread its share of the pages (a page
 * then sits on the memory node of the thread that committed it, as first touch would put it):
 * MADV_POPULATE_WRITE where the kernel has it (Linux 5.14; it faults pages in and changes no
 * byte), else a 0 written into each page where it overlaps [p, p + bytes), which leaves the
 * zeros as they were. For the KV caches: a first batch then pays no page faults as it writes
 * its keys and values. */
void pxl_commit(void *p, size_t bytes) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    char *base = (char *)((uintptr_t)p / page * page);
    size_t pages = ((char *)p + bytes - base + page - 1) / page;
#pragma omp parallel num_threads(pxl_num_threads())
    {
        size_t i0, i1;
        pxl_split(pages, 1, &i0, &i1);
        if (i0 < i1 && madvise(base + i0 * page, (i1 - i0) * page, MADV_POPULATE_WRITE) != 0)
            for (size_t i = i0; i < i1; i++) {
                char *a = base + i * page < (char *)p ? (char *)p : base + i * page;
                *(volatile char *)a = 0;
            }
    }
}
