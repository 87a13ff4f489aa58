/* stress.c: every vCPU, on whatever node it runs, increments a shared counter with a
 * locked instruction and updates a two-field structure under a spin-lock (the fields
 * must always differ by exactly the one step in progress). The counter, the lock and
 * the structure sit on different pages, so they move between nodes independently.
 * vCPU 0 checks the totals at the end and reports the counter; it returns 0 when every
 * invariant held, 5 if an update was lost or doubled, 6 if the lock let two in.
 * The argument string is the number of iterations per vCPU (default 3000).
 */
#include "common.h"

struct page { uint64_t v[512]; };
static struct page counter __attribute__((aligned(4096)));
static struct page lock __attribute__((aligned(4096)));
static struct page pair __attribute__((aligned(4096)));
static struct page misc __attribute__((aligned(4096)));
#define ARRIVED (*(uint32_t *)&misc.v[0])
#define BROKEN (misc.v[8])

static void spin_lock(void) {
    while (__atomic_exchange_n(&lock.v[0], 1, __ATOMIC_ACQUIRE))
        while (__atomic_load_n(&lock.v[0], __ATOMIC_RELAXED))
            __builtin_ia32_pause();
}

static void spin_unlock(void) { __atomic_store_n(&lock.v[0], 0, __ATOMIC_RELEASE); }

static void barrier(uint32_t n) {
    uint32_t seen = __atomic_add_fetch(&ARRIVED, 1, __ATOMIC_SEQ_CST);
    if (seen == n) {
        flotilla_futex_wake(&ARRIVED, UINT32_MAX);
        return;
    }
    while (seen < n) {
        flotilla_futex_wait(&ARRIVED, seen, 0);
        seen = __atomic_load_n(&ARRIVED, __ATOMIC_SEQ_CST);
    }
}

static uint64_t iterations(const struct flotilla_boot_info *boot) {
    const char *a = (const char *)(uintptr_t)boot->args_addr;
    uint64_t v = 0;
    for (uint64_t i = 0; i < boot->args_len; i++) {
        if (a[i] < '0' || a[i] > '9')
            return 3000;
        v = v * 10 + (uint64_t)(a[i] - '0');
    }
    return boot->args_len == 0 ? 3000 : v;
}

int _start(const struct flotilla_boot_info *boot, uint64_t vcpu) {
    uint32_t n = boot->vcpu_count;
    uint64_t iters = iterations(boot);
    for (uint64_t i = 0; i < iters; i++) {
        __atomic_fetch_add(&counter.v[0], 1, __ATOMIC_SEQ_CST);
        spin_lock();
        /* Plain loads and stores: only the lock makes this safe. */
        volatile uint64_t *p = pair.v;
        uint64_t a = p[0], b = p[256];
        if (a != b)
            BROKEN = 1;
        p[0] = a + 1;
        p[256] = b + 1;
        spin_unlock();
    }
    barrier(n);
    if (vcpu != 0)
        return 0;
    uint64_t total = (uint64_t)n * iters;
    uint64_t c = __atomic_load_n(&counter.v[0], __ATOMIC_SEQ_CST);
    flotilla_report(c);
    if (BROKEN)
        return 6;
    return c == total && pair.v[0] == total && pair.v[256] == total ? 0 : 5;
}
