# Instruction counts under qemu (benchmarks/rvv_instruction_counts.sh runs them and prints the
# table): a qemu TCG plugin that counts retired instructions between marker HINTs, and a riscv64
# driver that runs SmolLM2-135M's Linears and attention between those markers on a kernel set.
# The plugin loads into Debian's dynamic qemu-user (qemu-user-static cannot load plugins); its
# API header comes from Debian's qemu source package (riscv/qemu_plugin/plugin_header.sh).
COUNT_BUILD   := $(RV_BUILD)/count
QEMU_PLUGIN_H := build/qemu-plugin/qemu-plugin.h

.PHONY: count-rvv count-tools

$(QEMU_PLUGIN_H):
	sh riscv/qemu_plugin/plugin_header.sh $@

# a host shared object (qemu runs on the host): the host compiler, not the cross one
$(COUNT_BUILD)/libinsn_count.so: riscv/qemu_plugin/insn_count.c $(QEMU_PLUGIN_H)
	@mkdir -p $(dir $@)
	$(CC) -O2 -std=gnu11 -Wall -Wextra -Wno-unused-parameter -fPIC -shared -fvisibility=hidden \
	  -I$(dir $(QEMU_PLUGIN_H)) $< -o $@

# dynamic (it dlopens the sysroot's OpenBLAS), our kernels linked in
$(COUNT_BUILD)/count_driver: riscv/count/count_driver.c $(RV_OBJS)
	@mkdir -p $(dir $@)
	$(RV_CC) $(RV_CFLAGS) $^ -o $@ -lm -ldl

count-tools: $(COUNT_BUILD)/libinsn_count.so $(COUNT_BUILD)/count_driver

count-rvv:
	../benchmarks/rvv_instruction_counts.sh
