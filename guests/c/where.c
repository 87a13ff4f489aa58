/* where.c: each vCPU asks which node it runs on (NODE_ID, NODE_COUNT) before and after
 * its first write to a shared word, which lies in node 0's memory. Under always-page the
 * word comes to the vCPU, under always-vcpu the vCPU goes to the word, and the answers
 * show it. vCPU 0 prints one line per vCPU and reports sum(before*16 + after << 8*vcpu).
 *
 *   flotilla run --image where.elf --vcpus 2 --nodes 2 --policy always-vcpu
 */
#include "common.h"

#define MAX_VCPUS 8

static uint32_t shared;  /* the word every vCPU writes */
static uint32_t arrived; /* barrier */
static uint32_t before[MAX_VCPUS], after[MAX_VCPUS];

int _start(const struct flotilla_boot_info *boot, uint64_t vcpu) {
    uint32_t n = boot->vcpu_count;
    if (n > MAX_VCPUS)
        return 2;
    /* Both answers stay in registers until the vCPU has written the shared word. */
    uint32_t b = flotilla_node_id();
    __atomic_fetch_add(&shared, 1, __ATOMIC_SEQ_CST);
    uint32_t a = flotilla_node_id();
    before[vcpu] = b;
    after[vcpu] = a;
    barrier_on(&arrived, n);
    if (vcpu != 0)
        return 0;

    uint32_t nodes = flotilla_node_count();
    uint64_t code = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (before[i] >= nodes || after[i] >= nodes)
            return 3;
        char line[96];
        char *p = put_str(line, "vcpu ");
        p = put_u64(p, i);
        p = put_str(p, ": node ");
        p = put_u64(p, before[i]);
        p = put_str(p, " then node ");
        p = put_u64(p, after[i]);
        p = put_str(p, " of ");
        p = put_u64(p, nodes);
        *p++ = '\n';
        flotilla_write(1, line, (uint64_t)(p - line));
        code |= (uint64_t)(before[i] * 16 + after[i]) << (8 * i);
    }
    flotilla_report(code);
    return __atomic_load_n(&shared, __ATOMIC_SEQ_CST) == n ? 0 : 1;
}
