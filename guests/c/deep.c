/* deep.c: a guest that needs a deep stack. vCPU 0 recurses 48 levels with a 6 KiB frame
 * each (about 300 KiB, more than the default 256 KiB stack); the other vCPUs return at
 * once. With the default stack the run ends with a stack-overflow error naming vCPU 0;
 * with --stack-size 1M it reports the sum of the levels and returns 0.
 */
#include <flotilla.h>

__attribute__((used)) void *memset(void *dst, int c, size_t n) {
    void *d = dst;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return dst;
}

static __attribute__((noinline)) uint64_t down(uint32_t level) {
    volatile uint8_t frame[6144];
    for (uint32_t i = 0; i < sizeof frame; i += 512) frame[i] = (uint8_t)level;
    uint64_t below = level == 0 ? 0 : down(level - 1);
    return below + frame[0] + level;
}

int _start(const struct flotilla_boot_info *boot, uint64_t vcpu) {
    (void)boot;
    if (vcpu != 0) return 0;
    uint64_t sum = down(48);
    flotilla_report(sum);
    return sum == 2 * (48 * 49 / 2) ? 0 : 1;
}
