/* flotilla.h: the Flotilla guest ABI for C guests (version 1).
 *
 * GENERATED from guests/abi/src/lib.rs by guests/abi/tests/c_header.rs; do not edit.
 * Regenerate with: FLOTILLA_BLESS=1 cargo test -p flotilla-abi --test c_header
 * Reference: docs/guest-abi.md. Build guests with
 *   gcc -ffreestanding -nostdlib -static -fno-pie -no-pie -fno-stack-protector -O2 \
 *       -I guests/include -Wl,-Ttext-segment=0x400000 -Wl,--build-id=none \
 *       -o guest.elf guest.c
 */
#ifndef FLOTILLA_H
#define FLOTILLA_H

#include <stdint.h>
#include <stddef.h>

#define FLOTILLA_ABI_VERSION 0x1ULL
#define FLOTILLA_BOOT_INFO_MAGIC 0x414c4c49544f4c46ULL
#define FLOTILLA_PAGE_SIZE 0x1000ULL
#define FLOTILLA_GDT_ADDR 0x1000ULL
#define FLOTILLA_BOOT_INFO_ADDR 0x2000ULL
#define FLOTILLA_ARGS_ADDR 0x2100ULL
#define FLOTILLA_ARGS_MAX_BYTES 0xeffULL
#define FLOTILLA_RETURN_TRAMPOLINE_ADDR 0x3000ULL
#define FLOTILLA_PAGE_TABLES_ADDR 0x10000ULL
#define FLOTILLA_IMAGE_MIN_ADDR 0x200000ULL
#define FLOTILLA_RAM_MAX_BYTES 0x1000000000ULL
#define FLOTILLA_RAM_MIN_BYTES 0x400000ULL
#define FLOTILLA_VCPUS_MAX 0x40ULL
#define FLOTILLA_STACK_BYTES_DEFAULT 0x40000ULL
#define FLOTILLA_HYPERCALL_PORT_BASE 0x500ULL
#define FLOTILLA_HC_EXIT 0x0ULL
#define FLOTILLA_HC_RETURN 0x1ULL
#define FLOTILLA_HC_WRITE 0x2ULL
#define FLOTILLA_HC_VCPU_ID 0x3ULL
#define FLOTILLA_HC_VCPU_COUNT 0x4ULL
#define FLOTILLA_HC_CLOCK 0x5ULL
#define FLOTILLA_HC_FUTEX_WAIT 0x6ULL
#define FLOTILLA_HC_FUTEX_WAKE 0x7ULL
#define FLOTILLA_HC_YIELD 0x8ULL
#define FLOTILLA_HC_REPORT 0x9ULL
#define FLOTILLA_HC_NODE_ID 0xaULL
#define FLOTILLA_HC_NODE_COUNT 0xbULL
#define FLOTILLA_HC_COUNT 0xcULL
#define FLOTILLA_CLOCK_MONOTONIC 0x4ULL
#define FLOTILLA_EINVAL 22
#define FLOTILLA_EAGAIN 11
#define FLOTILLA_ETIMEDOUT 110

struct flotilla_boot_info {
    uint64_t magic;
    uint32_t abi_version;
    uint32_t vcpu_count;
    uint64_t ram_bytes;
    uint64_t free_start;
    uint64_t free_end;
    uint64_t image_start;
    uint64_t image_end;
    uint64_t stacks_start;
    uint64_t stack_bytes;
    uint64_t args_addr;
    uint64_t args_len;
};
_Static_assert(sizeof(struct flotilla_boot_info) == 88, "flotilla_boot_info size");
_Static_assert(offsetof(struct flotilla_boot_info, magic) == 0, "flotilla_boot_info.magic");
_Static_assert(offsetof(struct flotilla_boot_info, abi_version) == 8, "flotilla_boot_info.abi_version");
_Static_assert(offsetof(struct flotilla_boot_info, vcpu_count) == 12, "flotilla_boot_info.vcpu_count");
_Static_assert(offsetof(struct flotilla_boot_info, ram_bytes) == 16, "flotilla_boot_info.ram_bytes");
_Static_assert(offsetof(struct flotilla_boot_info, free_start) == 24, "flotilla_boot_info.free_start");
_Static_assert(offsetof(struct flotilla_boot_info, free_end) == 32, "flotilla_boot_info.free_end");
_Static_assert(offsetof(struct flotilla_boot_info, image_start) == 40, "flotilla_boot_info.image_start");
_Static_assert(offsetof(struct flotilla_boot_info, image_end) == 48, "flotilla_boot_info.image_end");
_Static_assert(offsetof(struct flotilla_boot_info, stacks_start) == 56, "flotilla_boot_info.stacks_start");
_Static_assert(offsetof(struct flotilla_boot_info, stack_bytes) == 64, "flotilla_boot_info.stack_bytes");
_Static_assert(offsetof(struct flotilla_boot_info, args_addr) == 72, "flotilla_boot_info.args_addr");
_Static_assert(offsetof(struct flotilla_boot_info, args_len) == 80, "flotilla_boot_info.args_len");

struct flotilla_write_args {
    uint32_t fd;
    uint32_t reserved;
    uint64_t buf;
    uint64_t len;
    int64_t result;
};
_Static_assert(sizeof(struct flotilla_write_args) == 32, "flotilla_write_args size");
_Static_assert(offsetof(struct flotilla_write_args, fd) == 0, "flotilla_write_args.fd");
_Static_assert(offsetof(struct flotilla_write_args, reserved) == 4, "flotilla_write_args.reserved");
_Static_assert(offsetof(struct flotilla_write_args, buf) == 8, "flotilla_write_args.buf");
_Static_assert(offsetof(struct flotilla_write_args, len) == 16, "flotilla_write_args.len");
_Static_assert(offsetof(struct flotilla_write_args, result) == 24, "flotilla_write_args.result");

struct flotilla_clock_args {
    uint32_t clock_id;
    int32_t result;
    uint64_t nanos;
};
_Static_assert(sizeof(struct flotilla_clock_args) == 16, "flotilla_clock_args size");
_Static_assert(offsetof(struct flotilla_clock_args, clock_id) == 0, "flotilla_clock_args.clock_id");
_Static_assert(offsetof(struct flotilla_clock_args, result) == 4, "flotilla_clock_args.result");
_Static_assert(offsetof(struct flotilla_clock_args, nanos) == 8, "flotilla_clock_args.nanos");

struct flotilla_futex_wait_args {
    uint64_t addr;
    uint32_t expected;
    uint32_t flags;
    uint64_t timeout_ns;
    int32_t result;
    uint32_t reserved;
};
_Static_assert(sizeof(struct flotilla_futex_wait_args) == 32, "flotilla_futex_wait_args size");
_Static_assert(offsetof(struct flotilla_futex_wait_args, addr) == 0, "flotilla_futex_wait_args.addr");
_Static_assert(offsetof(struct flotilla_futex_wait_args, expected) == 8, "flotilla_futex_wait_args.expected");
_Static_assert(offsetof(struct flotilla_futex_wait_args, flags) == 12, "flotilla_futex_wait_args.flags");
_Static_assert(offsetof(struct flotilla_futex_wait_args, timeout_ns) == 16, "flotilla_futex_wait_args.timeout_ns");
_Static_assert(offsetof(struct flotilla_futex_wait_args, result) == 24, "flotilla_futex_wait_args.result");
_Static_assert(offsetof(struct flotilla_futex_wait_args, reserved) == 28, "flotilla_futex_wait_args.reserved");

struct flotilla_futex_wake_args {
    uint64_t addr;
    uint32_t count;
    int32_t result;
};
_Static_assert(sizeof(struct flotilla_futex_wake_args) == 16, "flotilla_futex_wake_args size");
_Static_assert(offsetof(struct flotilla_futex_wake_args, addr) == 0, "flotilla_futex_wake_args.addr");
_Static_assert(offsetof(struct flotilla_futex_wake_args, count) == 8, "flotilla_futex_wake_args.count");
_Static_assert(offsetof(struct flotilla_futex_wake_args, result) == 12, "flotilla_futex_wake_args.result");

struct flotilla_report_args {
    uint64_t value;
};
_Static_assert(sizeof(struct flotilla_report_args) == 8, "flotilla_report_args size");
_Static_assert(offsetof(struct flotilla_report_args, value) == 0, "flotilla_report_args.value");

static inline void flotilla_out(uint16_t nr, uint32_t value) {
    __asm__ volatile("outl %0, %1" : : "a"(value), "Nd"((uint16_t)(FLOTILLA_HYPERCALL_PORT_BASE + nr)) : "memory");
}

static inline uint32_t flotilla_in(uint16_t nr) {
    uint32_t value;
    __asm__ volatile("inl %1, %0" : "=a"(value) : "Nd"((uint16_t)(FLOTILLA_HYPERCALL_PORT_BASE + nr)));
    return value;
}

#define FLOTILLA_BLOCK(p) ((uint32_t)(uintptr_t)(p))

static inline const struct flotilla_boot_info *flotilla_boot_info(void) {
    return (const struct flotilla_boot_info *)(uintptr_t)FLOTILLA_BOOT_INFO_ADDR;
}

static inline __attribute__((noreturn)) void flotilla_exit(int32_t status) {
    flotilla_out(FLOTILLA_HC_EXIT, (uint32_t)status);
    /* EXIT does not return. Spin rather than hlt, which faults at CPL 3. */
    for (;;) __asm__ volatile("pause");
}

static inline int64_t flotilla_write(int fd, const void *buf, uint64_t len) {
    struct flotilla_write_args a = { .fd = (uint32_t)fd, .buf = (uint64_t)(uintptr_t)buf, .len = len };
    flotilla_out(FLOTILLA_HC_WRITE, FLOTILLA_BLOCK(&a));
    return a.result;
}

static inline uint32_t flotilla_vcpu_id(void) { return flotilla_in(FLOTILLA_HC_VCPU_ID); }
static inline uint32_t flotilla_vcpu_count(void) { return flotilla_in(FLOTILLA_HC_VCPU_COUNT); }
static inline uint32_t flotilla_node_id(void) { return flotilla_in(FLOTILLA_HC_NODE_ID); }
static inline uint32_t flotilla_node_count(void) { return flotilla_in(FLOTILLA_HC_NODE_COUNT); }

static inline uint64_t flotilla_clock_ns(void) {
    struct flotilla_clock_args a = { .clock_id = FLOTILLA_CLOCK_MONOTONIC };
    flotilla_out(FLOTILLA_HC_CLOCK, FLOTILLA_BLOCK(&a));
    return a.nanos;
}

static inline int32_t flotilla_futex_wait(const uint32_t *addr, uint32_t expected, uint64_t timeout_ns) {
    struct flotilla_futex_wait_args a = { .addr = (uint64_t)(uintptr_t)addr, .expected = expected, .timeout_ns = timeout_ns };
    flotilla_out(FLOTILLA_HC_FUTEX_WAIT, FLOTILLA_BLOCK(&a));
    return a.result;
}

static inline int32_t flotilla_futex_wake(const uint32_t *addr, uint32_t count) {
    struct flotilla_futex_wake_args a = { .addr = (uint64_t)(uintptr_t)addr, .count = count };
    flotilla_out(FLOTILLA_HC_FUTEX_WAKE, FLOTILLA_BLOCK(&a));
    return a.result;
}

static inline void flotilla_yield(void) { flotilla_out(FLOTILLA_HC_YIELD, 0); }

static inline void flotilla_report(uint64_t value) {
    struct flotilla_report_args a = { .value = value };
    flotilla_out(FLOTILLA_HC_REPORT, FLOTILLA_BLOCK(&a));
}

#endif /* FLOTILLA_H */
