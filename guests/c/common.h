/* common.h: what the test and probe guests in this directory share. A guest has no libc:
 * gcc may emit calls to memcpy and memset even with -ffreestanding, and the asm bodies
 * keep it from compiling them into calls to themselves. hello.c, the documented example,
 * stays self-contained on purpose.
 */
#ifndef FLOTILLA_GUESTS_COMMON_H
#define FLOTILLA_GUESTS_COMMON_H

#include <flotilla.h>

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

/* Every one of n vCPUs adds one to *arrived and waits until all have; the last wakes the
 * rest. Waiters re-check the word after every return (-EAGAIN, spurious wake-ups). */
static inline void barrier_on(uint32_t *arrived, uint32_t n) {
    uint32_t seen = __atomic_add_fetch(arrived, 1, __ATOMIC_SEQ_CST);
    if (seen == n) {
        flotilla_futex_wake(arrived, UINT32_MAX);
        return;
    }
    while (seen < n) {
        flotilla_futex_wait(arrived, seen, 0);
        seen = __atomic_load_n(arrived, __ATOMIC_SEQ_CST);
    }
}

static inline char *put_str(char *p, const char *s) {
    while (*s)
        *p++ = *s++;
    return p;
}

static inline char *put_u64(char *p, uint64_t v) {
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

#endif
