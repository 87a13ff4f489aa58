/* hello.c: a minimal Flotilla guest in C (docs/guest-abi.md, "Writing a guest in C").
 * Every vCPU adds vcpu+1 to a shared counter and waits at a futex barrier; vCPU 0 then
 * prints and reports the sum and returns 0 if it is n*(n+1)/2, else 1. With the argument
 * string "fail", vCPU 0 ends the guest with EXIT code 3 instead.
 *
 *   gcc -ffreestanding -nostdlib -static -fno-pie -no-pie -fno-stack-protector -O2 \
 *       -I guests/include -Wl,-Ttext-segment=0x400000 -Wl,--build-id=none \
 *       -o hello.elf guests/c/hello.c
 *   flotilla run --image hello.elf --vcpus 4
 */
#include <flotilla.h>

/* gcc may emit calls to these even with -ffreestanding, and a guest has no libc. The
 * asm bodies keep gcc from compiling them into calls to themselves. */
__attribute__((used)) void *memcpy(void *dst, const void *src, size_t n) {
    void *d = dst;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
    return dst;
}

__attribute__((used)) void *memset(void *dst, int c, size_t n) {
    void *d = dst;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return dst;
}

static uint32_t sum;     /* sum of vcpu+1 over all vCPUs (.bss: zero at entry) */
static uint32_t arrived; /* barrier: how many vCPUs reached it */

/* The last vCPU to arrive wakes the others. Waiters re-check the word after every
 * return: the value may have changed already (-EAGAIN) and wake-ups may be spurious. */
static void barrier(uint32_t n) {
    uint32_t seen = __atomic_add_fetch(&arrived, 1, __ATOMIC_SEQ_CST);
    if (seen == n) {
        flotilla_futex_wake(&arrived, UINT32_MAX);
        return;
    }
    while (seen < n) {
        flotilla_futex_wait(&arrived, seen, 0);
        seen = __atomic_load_n(&arrived, __ATOMIC_SEQ_CST);
    }
}

static char *put_str(char *p, const char *s) {
    while (*s)
        *p++ = *s++;
    return p;
}

static char *put_u64(char *p, uint64_t v) {
    char digits[20];
    int k = 0;
    do {
        digits[k++] = (char)('0' + v % 10);
        v /= 10;
    } while (v != 0);
    while (k > 0)
        *p++ = digits[--k];
    return p;
}

static int args_equal(const struct flotilla_boot_info *boot, const char *s) {
    const char *a = (const char *)(uintptr_t)boot->args_addr;
    uint64_t i = 0;
    for (; s[i] != 0; i++)
        if (i >= boot->args_len || a[i] != s[i])
            return 0;
    return i == boot->args_len;
}

int _start(const struct flotilla_boot_info *boot, uint64_t vcpu) {
    if (boot->magic != FLOTILLA_BOOT_INFO_MAGIC || boot->abi_version != FLOTILLA_ABI_VERSION)
        return 4;
    uint32_t n = boot->vcpu_count;
    if (flotilla_vcpu_count() != n || flotilla_vcpu_id() != vcpu)
        return 1;

    __atomic_fetch_add(&sum, (uint32_t)vcpu + 1, __ATOMIC_SEQ_CST);
    barrier(n);
    if (vcpu != 0)
        return 0;

    if (args_equal(boot, "fail"))
        flotilla_exit(3);
    uint64_t s = __atomic_load_n(&sum, __ATOMIC_SEQ_CST);
    char line[64];
    char *p = put_str(line, "hello from C on ");
    p = put_u64(p, n);
    p = put_str(p, " vCPUs: sum=");
    p = put_u64(p, s);
    *p++ = '\n';
    flotilla_write(1, line, (uint64_t)(p - line));
    flotilla_report(s);
    return s == (uint64_t)n * (n + 1) / 2 ? 0 : 1;
}
