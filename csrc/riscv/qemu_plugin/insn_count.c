/* A qemu TCG plugin that counts the RISC-V instructions a guest retires between marker
 * instructions, split into vector (RVV) and scalar ones (benchmarks/rvv_instruction_counts.sh).
 *
 * Markers are HINTs the ISA leaves for custom use, no-ops on every RISC-V core:
 *   slti x0, x0, 0x5b1   begin a region        slti x0, x0, 0x5b2   end it
 * (PXL_COUNT_BEGIN / PXL_COUNT_END in riscv/count/count_driver.c). Regions are numbered in the
 * order they end; at exit the plugin writes one line per region,
 *   region <i> insns <total> vector <rvv>
 * and a last line `program insns <total> vector <rvv>`, to outfile=PATH or qemu's log (stderr).
 *
 * Counting is inline (no callback per instruction): when a translation block runs, two counters
 * grow by its instruction count and by how many of those are RVV. Those adds run at the block's
 * start, so a marker's callback, knowing where in its block it sits, takes off the instructions
 * of the block not yet run: the count is exact to the instruction. Inline adds are not atomic,
 * so the guest must run one thread (the driver does; OpenBLAS with OPENBLAS_NUM_THREADS=1).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#define MARK_BEGIN 0x5b1
#define MARK_END 0x5b2
#define MAX_REGIONS 4096

/* slti x0, x0, imm: imm[31:20] rs1=x0 funct3=010 rd=x0 opcode=0010011 */
#define SLTI_X0(imm) (((uint32_t)(imm) << 20) | (2u << 12) | 0x13u)

typedef struct {
    uint64_t total, vector;
} counts;

static counts now;         /* instructions retired so far (per whole translation block run) */
static counts begin;       /* at the open region's begin marker */
static counts regions[MAX_REGIONS];
static int n_regions, open_region, overflow;
static const char *outfile;

/* what a marker's callback needs: which marker, and how many of its block's instructions (and
 * RVV ones) the block's inline adds have counted that have not run yet */
typedef struct {
    int end;
    counts ahead;
} marker;

/* RVV 1.0 encodings: OP-V (arithmetic and vset{i}vl{i}), and LOAD-FP / STORE-FP with a vector
 * width (funct3 0, 5, 6, 7; 1-4 are the scalar flh / flw / fld / flq and their stores) */
static int is_rvv(uint32_t w) {
    uint32_t op = w & 0x7f, width = (w >> 12) & 7;
    if (op == 0x57) return 1;
    if (op == 0x07 || op == 0x27) return width == 0 || width >= 5;
    return 0;
}

static void on_marker(unsigned int vcpu, void *data) {
    const marker *m = data;
    counts c = {now.total - m->ahead.total, now.vector - m->ahead.vector};
    if (!m->end) {
        begin = c;
        open_region = 1;
        return;
    }
    if (!open_region) return; /* an end without a begin: nothing to measure */
    open_region = 0;
    if (n_regions == MAX_REGIONS) {
        overflow = 1;
        return;
    }
    regions[n_regions++] = (counts){c.total - begin.total, c.vector - begin.vector};
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
    size_t n = qemu_plugin_tb_n_insns(tb);
    uint32_t words[n > 0 ? n : 1];
    uint64_t n_vec = 0;
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        words[i] = 0;
        if (qemu_plugin_insn_size(insn) == 4) memcpy(&words[i], qemu_plugin_insn_data(insn), 4);
        n_vec += is_rvv(words[i]);
    }
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &now.total, n);
    if (n_vec) qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &now.vector, n_vec);

    uint64_t vec_after = n_vec; /* RVV instructions from index i to the block's end */
    for (size_t i = 0; i < n; i++) {
        int end = words[i] == SLTI_X0(MARK_END);
        if (end || words[i] == SLTI_X0(MARK_BEGIN)) {
            /* a begin counts itself (everything up to it is before the region), an end does not:
             * the region holds exactly the instructions strictly between the two */
            marker *m = malloc(sizeof *m); /* lives as long as the translation: never freed */
            m->end = end;
            m->ahead = (counts){n - i - !end, vec_after};
            qemu_plugin_register_vcpu_insn_exec_cb(qemu_plugin_tb_get_insn(tb, i), on_marker,
                                                   QEMU_PLUGIN_CB_NO_REGS, m);
        }
        vec_after -= is_rvv(words[i]);
    }
}

static void report(qemu_plugin_id_t id, void *data) {
    FILE *f = outfile ? fopen(outfile, "w") : NULL;
    char line[128];
    for (int i = 0; i <= n_regions; i++) {
        counts c = i < n_regions ? regions[i] : now;
        if (i < n_regions)
            snprintf(line, sizeof line, "region %d insns %llu vector %llu\n", i, (unsigned long long)c.total,
                     (unsigned long long)c.vector);
        else
            snprintf(line, sizeof line, "program insns %llu vector %llu%s\n", (unsigned long long)c.total,
                     (unsigned long long)c.vector, overflow ? " (regions past the 4096th dropped)" : "");
        if (f) fputs(line, f);
        else qemu_plugin_outs(line);
    }
    if (f) fclose(f);
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv) {
    if (strcmp(info->target_name, "riscv64") && strcmp(info->target_name, "riscv32")) {
        fprintf(stderr, "insn_count: a RISC-V guest is needed, not %s\n", info->target_name);
        return -1;
    }
    for (int i = 0; i < argc; i++) {
        if (!strncmp(argv[i], "outfile=", 8)) {
            outfile = argv[i] + 8;
        } else {
            fprintf(stderr, "insn_count: unknown option %s (outfile=PATH is the only one)\n", argv[i]);
            return -1;
        }
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_atexit_cb(id, report, NULL);
    return 0;
}
