//! Generates `guests/include/flotilla.h` from the Rust definition and checks that the
//! committed header is exactly that. `FLOTILLA_BLESS=1` rewrites the header instead.
//! The header also carries `_Static_assert`s on struct sizes and field offsets, so the C
//! compiler checks its view of the layout when the C guest test builds it.

use flotilla_abi::*;
use std::fmt::Write as _;
use std::mem::{offset_of, size_of};
use std::path::PathBuf;

fn header_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../include/flotilla.h")
}

fn render() -> String {
    let mut h = String::new();
    let w = &mut h;
    writeln!(
        w,
        "/* flotilla.h: the Flotilla guest ABI for C guests (version {ABI_VERSION})."
    )
    .unwrap();
    for line in [
        " *",
        " * GENERATED from guests/abi/src/lib.rs by guests/abi/tests/c_header.rs; do not edit.",
        " * Regenerate with: FLOTILLA_BLESS=1 cargo test -p flotilla-abi --test c_header",
        " * Reference: docs/guest-abi.md. Build guests with",
        " *   gcc -ffreestanding -nostdlib -static -fno-pie -no-pie -fno-stack-protector -O2 \\",
        " *       -I guests/include -Wl,-Ttext-segment=0x400000 -Wl,--build-id=none \\",
        " *       -o guest.elf guest.c",
        " */",
        "#ifndef FLOTILLA_H",
        "#define FLOTILLA_H",
        "",
        "#include <stdint.h>",
        "#include <stddef.h>",
        "",
    ] {
        writeln!(w, "{line}").unwrap();
    }
    let consts: &[(&str, u64)] = &[
        ("FLOTILLA_ABI_VERSION", ABI_VERSION as u64),
        ("FLOTILLA_BOOT_INFO_MAGIC", BOOT_INFO_MAGIC),
        ("FLOTILLA_PAGE_SIZE", PAGE_SIZE),
        ("FLOTILLA_GDT_ADDR", GDT_ADDR),
        ("FLOTILLA_BOOT_INFO_ADDR", BOOT_INFO_ADDR),
        ("FLOTILLA_ARGS_ADDR", ARGS_ADDR),
        ("FLOTILLA_ARGS_MAX_BYTES", ARGS_MAX_BYTES),
        ("FLOTILLA_RETURN_TRAMPOLINE_ADDR", RETURN_TRAMPOLINE_ADDR),
        ("FLOTILLA_PAGE_TABLES_ADDR", PAGE_TABLES_ADDR),
        ("FLOTILLA_IMAGE_MIN_ADDR", IMAGE_MIN_ADDR),
        ("FLOTILLA_RAM_MAX_BYTES", RAM_MAX_BYTES),
        ("FLOTILLA_RAM_MIN_BYTES", RAM_MIN_BYTES),
        ("FLOTILLA_VCPUS_MAX", VCPUS_MAX as u64),
        ("FLOTILLA_STACK_BYTES_DEFAULT", STACK_BYTES_DEFAULT),
        ("FLOTILLA_HYPERCALL_PORT_BASE", HYPERCALL_PORT_BASE as u64),
        ("FLOTILLA_HC_EXIT", hypercall::EXIT as u64),
        ("FLOTILLA_HC_RETURN", hypercall::RETURN as u64),
        ("FLOTILLA_HC_WRITE", hypercall::WRITE as u64),
        ("FLOTILLA_HC_VCPU_ID", hypercall::VCPU_ID as u64),
        ("FLOTILLA_HC_VCPU_COUNT", hypercall::VCPU_COUNT as u64),
        ("FLOTILLA_HC_CLOCK", hypercall::CLOCK as u64),
        ("FLOTILLA_HC_FUTEX_WAIT", hypercall::FUTEX_WAIT as u64),
        ("FLOTILLA_HC_FUTEX_WAKE", hypercall::FUTEX_WAKE as u64),
        ("FLOTILLA_HC_YIELD", hypercall::YIELD as u64),
        ("FLOTILLA_HC_REPORT", hypercall::REPORT as u64),
        ("FLOTILLA_HC_NODE_ID", hypercall::NODE_ID as u64),
        ("FLOTILLA_HC_NODE_COUNT", hypercall::NODE_COUNT as u64),
        ("FLOTILLA_HC_COUNT", hypercall::COUNT as u64),
        ("FLOTILLA_CLOCK_MONOTONIC", CLOCK_MONOTONIC as u64),
    ];
    for (name, value) in consts {
        writeln!(w, "#define {name} {value:#x}ULL").unwrap();
    }
    // Error numbers are plain ints, so `result == -FLOTILLA_EAGAIN` compares as signed.
    let errnos = [
        ("FLOTILLA_EINVAL", errno::EINVAL),
        ("FLOTILLA_EAGAIN", errno::EAGAIN),
        ("FLOTILLA_ETIMEDOUT", errno::ETIMEDOUT),
    ];
    for (name, value) in errnos {
        writeln!(w, "#define {name} {value}").unwrap();
    }
    w.push('\n');

    struct Field(&'static str, &'static str, usize);
    let structs: Vec<(&str, usize, Vec<Field>)> = vec![
        (
            "flotilla_boot_info",
            size_of::<BootInfo>(),
            vec![
                Field("uint64_t", "magic", offset_of!(BootInfo, magic)),
                Field("uint32_t", "abi_version", offset_of!(BootInfo, abi_version)),
                Field("uint32_t", "vcpu_count", offset_of!(BootInfo, vcpu_count)),
                Field("uint64_t", "ram_bytes", offset_of!(BootInfo, ram_bytes)),
                Field("uint64_t", "free_start", offset_of!(BootInfo, free_start)),
                Field("uint64_t", "free_end", offset_of!(BootInfo, free_end)),
                Field("uint64_t", "image_start", offset_of!(BootInfo, image_start)),
                Field("uint64_t", "image_end", offset_of!(BootInfo, image_end)),
                Field(
                    "uint64_t",
                    "stacks_start",
                    offset_of!(BootInfo, stacks_start),
                ),
                Field("uint64_t", "stack_bytes", offset_of!(BootInfo, stack_bytes)),
                Field("uint64_t", "args_addr", offset_of!(BootInfo, args_addr)),
                Field("uint64_t", "args_len", offset_of!(BootInfo, args_len)),
            ],
        ),
        (
            "flotilla_write_args",
            size_of::<WriteArgs>(),
            vec![
                Field("uint32_t", "fd", offset_of!(WriteArgs, fd)),
                Field("uint32_t", "reserved", offset_of!(WriteArgs, _reserved)),
                Field("uint64_t", "buf", offset_of!(WriteArgs, buf)),
                Field("uint64_t", "len", offset_of!(WriteArgs, len)),
                Field("int64_t", "result", offset_of!(WriteArgs, result)),
            ],
        ),
        (
            "flotilla_clock_args",
            size_of::<ClockArgs>(),
            vec![
                Field("uint32_t", "clock_id", offset_of!(ClockArgs, clock_id)),
                Field("int32_t", "result", offset_of!(ClockArgs, result)),
                Field("uint64_t", "nanos", offset_of!(ClockArgs, nanos)),
            ],
        ),
        (
            "flotilla_futex_wait_args",
            size_of::<FutexWaitArgs>(),
            vec![
                Field("uint64_t", "addr", offset_of!(FutexWaitArgs, addr)),
                Field("uint32_t", "expected", offset_of!(FutexWaitArgs, expected)),
                Field("uint32_t", "flags", offset_of!(FutexWaitArgs, flags)),
                Field(
                    "uint64_t",
                    "timeout_ns",
                    offset_of!(FutexWaitArgs, timeout_ns),
                ),
                Field("int32_t", "result", offset_of!(FutexWaitArgs, result)),
                Field("uint32_t", "reserved", offset_of!(FutexWaitArgs, _reserved)),
            ],
        ),
        (
            "flotilla_futex_wake_args",
            size_of::<FutexWakeArgs>(),
            vec![
                Field("uint64_t", "addr", offset_of!(FutexWakeArgs, addr)),
                Field("uint32_t", "count", offset_of!(FutexWakeArgs, count)),
                Field("int32_t", "result", offset_of!(FutexWakeArgs, result)),
            ],
        ),
        (
            "flotilla_report_args",
            size_of::<ReportArgs>(),
            vec![Field("uint64_t", "value", offset_of!(ReportArgs, value))],
        ),
    ];
    for (name, size, fields) in &structs {
        writeln!(w, "struct {name} {{").unwrap();
        for Field(ty, field, _) in fields {
            writeln!(w, "    {ty} {field};").unwrap();
        }
        writeln!(w, "}};").unwrap();
        writeln!(
            w,
            "_Static_assert(sizeof(struct {name}) == {size}, \"{name} size\");"
        )
        .unwrap();
        for Field(_, field, offset) in fields {
            writeln!(
                w,
                "_Static_assert(offsetof(struct {name}, {field}) == {offset}, \"{name}.{field}\");"
            )
            .unwrap();
        }
        w.push('\n');
    }
    w.push_str(C_CALLS);
    w.push_str("\n#endif /* FLOTILLA_H */\n");
    h
}

/// Hypercall wrappers for C. Parameter blocks are on the stack (below 4 GiB).
const C_CALLS: &str = r#"static inline void flotilla_out(uint16_t nr, uint32_t value) {
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
"#;

#[test]
fn c_header_matches_the_rust_definition() {
    let expected = render();
    let path = header_path();
    if std::env::var_os("FLOTILLA_BLESS").is_some() {
        std::fs::write(&path, &expected).expect("write flotilla.h");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == expected,
        "{} is out of date with guests/abi/src/lib.rs; regenerate it with \
         FLOTILLA_BLESS=1 cargo test -p flotilla-abi --test c_header",
        path.display()
    );
}
