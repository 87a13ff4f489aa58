/* pull.c: the remote-fault probe of `flotilla bench fault-latency` (built into the
 * engine's image set by guests/images/build.rs). Arguments: "PAGES PASSES".
 *
 * vCPU 0 writes one word into each of PAGES pages of free memory, then waits in a futex,
 * idle, so its node's CPU stays free to serve. vCPU 1 (on another node) then reads one
 * word of each page, PASSES times: on its first pass every page is a remote read fault
 * that brings 4 KiB of data. vCPU 1 reports the sum, PASSES * PAGES * (PAGES + 1) / 2.
 * Any other vCPU returns at once.
 */
#include "common.h"

static uint32_t ready; /* vCPU 0 wrote the pages */
static uint32_t done;  /* vCPU 1 read them */

static void wait_for(uint32_t *word) {
    while (__atomic_load_n(word, __ATOMIC_SEQ_CST) == 0)
        flotilla_futex_wait(word, 0, 0);
}

static void post(uint32_t *word) {
    __atomic_store_n(word, 1, __ATOMIC_SEQ_CST);
    flotilla_futex_wake(word, UINT32_MAX);
}

/* The next decimal number in [*at, end), or -1 if there is none. */
static int64_t number(const char **at, const char *end) {
    const char *p = *at;
    while (p < end && *p == ' ')
        p++;
    if (p == end || *p < '0' || *p > '9')
        return -1;
    int64_t v = 0;
    while (p < end && *p >= '0' && *p <= '9' && v < (1LL << 40))
        v = v * 10 + (*p++ - '0');
    *at = p;
    return v;
}

int _start(const struct flotilla_boot_info *boot, uint64_t vcpu) {
    const char *args = (const char *)(uintptr_t)boot->args_addr;
    const char *end = args + boot->args_len;
    int64_t pages = number(&args, end), passes = number(&args, end);
    if (pages < 1 || passes < 1)
        return 2;
    uint64_t base = (boot->free_start + 4095) & ~4095ULL;
    if (base + (uint64_t)pages * 4096 > boot->free_end)
        return 3;
    volatile uint64_t *mem = (volatile uint64_t *)(uintptr_t)base;
    if (vcpu == 0) {
        for (int64_t i = 0; i < pages; i++)
            mem[i * 512] = (uint64_t)i + 1;
        post(&ready);
        wait_for(&done);
        return 0;
    }
    if (vcpu != 1)
        return 0;
    wait_for(&ready);
    uint64_t sum = 0;
    for (int64_t r = 0; r < passes; r++)
        for (int64_t i = 0; i < pages; i++)
            sum += mem[i * 512];
    flotilla_report(sum);
    post(&done);
    return 0;
}
