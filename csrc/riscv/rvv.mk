# RISC-V: clang-16 cross build (RVV 1.0 intrinsics, v0.11 API), static test binary run under
# qemu-user-static at several VLENs with tail/mask-agnostic lanes filled with 1s, so a missing
# _tu policy or a hard-coded VLEN fails (../shared/notes/rvv_toolchain.md).
RV_CC     ?= clang-16
RV_FLAGS  := --target=riscv64-linux-gnu -march=rv64gcv -mabi=lp64d
# -no-stack-slot-sharing: clang-16's Stack Slot Coloring pass miscompiles pxl_linear.c's
# linear_team for RISC-V at -O2 (q/k/v read from bf16 rows come out wrong); at -O1, or with
# every spill in a slot of its own, the bits are right
RV_CFLAGS := $(RV_FLAGS) -O2 -mllvm -no-stack-slot-sharing -std=gnu11 -fPIC -Iinclude \
             -Werror=implicit-function-declaration -Wno-unknown-pragmas
RV_BUILD  := build/rv64
RV_SRCS   := $(wildcard generic/*.c core/*.c riscv/*.c)
RV_OBJS   := $(RV_SRCS:%.c=$(RV_BUILD)/%.o)
QEMU      ?= qemu-riscv64-static
# the smallest and largest VLEN by default (CI time); RV_VLENS="128 256 512 1024" runs them all
RV_VLENS  ?= 128 1024

$(RV_BUILD)/%.o: %.c $(HDRS)
	@mkdir -p $(dir $@)
	$(RV_CC) $(RV_CFLAGS) -c $< -o $@

# The library's threads: LLVM's libomp for riscv64 from the sysroot (rv64-sysroot), since clang-16
# emits libomp's ABI and the cross gcc's libgomp does not take it. The files with OpenMP are
# compiled a second time for the library; the static test binaries have no libomp to link and
# keep the single-threaded objects. Without the sysroot the library is single-threaded too.
RV_SYSROOT := build/rv64-sysroot
RV_OMP_H   := $(firstword $(wildcard $(RV_SYSROOT)/usr/lib/llvm-*/lib/clang/*/include/omp.h))
ifneq ($(RV_OMP_H),)
RV_OMP_SRCS := $(shell grep -l -e '^\#pragma omp' -e 'omp_get' core/*.c)
RV_LIB_OBJS := $(filter-out $(RV_OMP_SRCS:%.c=$(RV_BUILD)/%.o),$(RV_OBJS)) $(RV_OMP_SRCS:%.c=$(RV_BUILD)/omp/%.o)
RV_LIB_OMP  := -L$(RV_SYSROOT)/usr/lib/riscv64-linux-gnu -l:libomp.so.5
else
RV_LIB_OBJS := $(RV_OBJS)
endif

# (omp.h alone in its own directory: clang-19's other headers must not shadow clang-16's)
$(RV_BUILD)/omp/include/omp.h: $(RV_OMP_H)
	@mkdir -p $(dir $@)
	cp $< $@

$(RV_BUILD)/omp/%.o: %.c $(HDRS) $(RV_BUILD)/omp/include/omp.h
	@mkdir -p $(dir $@)
	$(RV_CC) $(RV_CFLAGS) -fopenmp -isystem $(RV_BUILD)/omp/include -c $< -o $@

$(RV_BUILD)/libperfxlm_kernels.so: $(RV_LIB_OBJS)
	$(RV_CC) $(RV_FLAGS) -shared -o $@ $^ $(RV_LIB_OMP) -lm

# the test's scalar reference must stay scalar: clang auto-vectorises plain loops into RVV
$(RV_BUILD)/test_kernels: tests/test_kernels.c $(RV_OBJS)
	$(RV_CC) $(RV_CFLAGS) -fno-vectorize -fno-slp-vectorize -static $^ -o $@ -lm

$(RV_BUILD)/test_kquants: tests/test_kquants.c $(RV_OBJS)
	$(RV_CC) $(RV_CFLAGS) -fno-vectorize -fno-slp-vectorize -static $^ -o $@ -lm

test-rvv:
	@if ! command -v $(RV_CC) >/dev/null || ! command -v $(QEMU) >/dev/null; then \
	  echo "test-rvv: skipped ($(RV_CC) or $(QEMU) missing: sh .ci/toolchains.sh)"; \
	  exit $${PXL_REQUIRE_TOOLCHAINS:-0}; fi; \
	$(MAKE) --no-print-directory $(RV_BUILD)/test_kernels $(RV_BUILD)/test_kquants $(RV_BUILD)/libperfxlm_kernels.so \
	  || exit 1; \
	jobs=$$(nproc 2>/dev/null || echo 1); \
	echo "== qemu rv64 at VLEN $(RV_VLENS), $$jobs at a time (qemu-user runs the test on one core)"; \
	printf '%s\n' $(RV_VLENS) | xargs -P $$jobs -I{} sh -c \
	  'cpu=rv64,v=true,vext_spec=v1.0,vlen={},elen=64,rvv_ta_all_1s=true,rvv_ma_all_1s=true; \
	   $(QEMU) -cpu $$cpu $(RV_BUILD)/test_kernels > $(RV_BUILD)/test-vlen{}.log 2>&1; rc=$$?; \
	   $(QEMU) -cpu $$cpu $(RV_BUILD)/test_kquants >> $(RV_BUILD)/test-vlen{}.log 2>&1; \
	   echo $$((rc | $$?)) > $(RV_BUILD)/test-vlen{}.rc; \
	   echo "   VLEN={} done"'; \
	for v in $(RV_VLENS); do \
	  echo "== qemu rv64 VLEN=$$v"; \
	  grep -v '^skip' $(RV_BUILD)/test-vlen$$v.log | grep -v '^ok'; \
	  [ "$$(cat $(RV_BUILD)/test-vlen$$v.rc)" = 0 ] || exit 1; \
	done

# riscv64 Python + numpy from Debian trixie, for the `rvv` plugin test under qemu (tests/test_rvv_qemu.py)
rv64-sysroot:
	@if command -v apt-get >/dev/null; then sh riscv/sysroot.sh build/rv64-sysroot; \
	else echo "rv64-sysroot: skipped (no apt-get)"; exit $${PXL_REQUIRE_TOOLCHAINS:-0}; fi

include riscv/count.mk
