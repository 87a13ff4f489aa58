/* fault.c: a guest that fails mid-run. Every vCPU writes its share of a shared array
 * (pages move between nodes); then vCPU 1 prints a line and executes ud2, which at
 * CPL 3 without an IDT ends the run as a triple fault, while the others keep writing.
 * The tests check that the run ends with that error, keeps the console output, and that
 * stopping the transfers still in flight logs nothing.
 */
#include <flotilla.h>

static volatile uint64_t shared[8192];

int _start(const struct flotilla_boot_info *boot, uint64_t vcpu) {
    (void)boot;
    uint32_t me = (uint32_t)vcpu;
    uint32_t n = flotilla_vcpu_count();
    for (int r = 0; r < 50; r++)
        for (uint32_t i = me; i < 8192; i += n) shared[i] += r;
    if (me == 1 || n == 1) {
        flotilla_write(1, "about to fault\n", 15);
        __asm__ volatile("ud2");
    }
    for (;;)
        for (uint32_t i = me; i < 8192; i += n) shared[i] += 1;
}
