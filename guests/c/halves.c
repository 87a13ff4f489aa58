/* halves.c: false sharing across nodes. Two vCPUs (run them on different nodes) write
 * the two halves of one page with plain stores, round after round, and after each round
 * (a barrier between) each checks the other's half: it must see the other vCPU's latest
 * value there. With page coherence right, the page moves (or the vCPUs do) every round;
 * a node that kept a writable copy of the page after giving it away would keep its
 * half's old contents on the other node. vCPU 0 reports the rounds that saw a stale
 * half (0 when coherent) and returns 0 only then. Argument: rounds (default 200).
 */
#include <flotilla.h>

__attribute__((used)) void *memset(void *dst, int c, size_t n) {
    void *d = dst;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return dst;
}

struct page { volatile uint64_t v[512]; };
/* In free memory, which no node has touched at boot (unlike the image's .bss). */
#define SHARED(boot) ((struct page *)(uintptr_t)((boot)->free_start + 7 * 4096))
static struct page misc __attribute__((aligned(4096)));
#define ARRIVED (*(uint32_t *)&misc.v[0])
static struct page counts __attribute__((aligned(4096)));

static void barrier(uint32_t *count, uint32_t target) {
    uint32_t seen = __atomic_add_fetch(count, 1, __ATOMIC_SEQ_CST);
    while (seen < target) {
        flotilla_futex_wait(count, seen, 0);
        seen = __atomic_load_n(count, __ATOMIC_SEQ_CST);
    }
    flotilla_futex_wake(count, UINT32_MAX);
}

static uint64_t rounds(const struct flotilla_boot_info *boot) {
    const char *a = (const char *)(uintptr_t)boot->args_addr;
    uint64_t v = 0;
    for (uint64_t i = 0; i < boot->args_len; i++) {
        if (a[i] < '0' || a[i] > '9') return 200;
        v = v * 10 + (uint64_t)(a[i] - '0');
    }
    return boot->args_len == 0 ? 200 : v;
}

int _start(const struct flotilla_boot_info *boot, uint64_t vcpu) {
    uint64_t n = rounds(boot);
    if (vcpu > 1) return 0;
    uint32_t me = (uint32_t)vcpu, other = 1 - me;
    struct page *sh = SHARED(boot);
    uint32_t k = 0; /* barriers passed */
    for (uint64_t r = 1; r <= n; r++) {
        for (uint32_t i = 0; i < 256; i++) sh->v[me * 256 + i] = r * 2 + me;
        barrier(&ARRIVED, 2 * ++k);
        for (uint32_t i = 0; i < 256; i++) {
            if (sh->v[other * 256 + i] != r * 2 + other) {
                counts.v[me]++;
                break;
            }
        }
        barrier(&ARRIVED, 2 * ++k);
    }
    if (me != 0) return 0;
    uint64_t bad = counts.v[0] + counts.v[1];
    flotilla_report(bad);
    return bad == 0 ? 0 : 7;
}
