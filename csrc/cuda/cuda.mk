# GPU sources: csrc/cuda/*.cu, built by nvcc for NVIDIA and by hipcc (through
# dcu/pxl_hip_vendor.h) for Hygon DCU / AMD. The check targets compile every file.
NVCC        ?= nvcc
HIPCC       ?= hipcc
CUDA_SRCS   := $(wildcard cuda/*.cu)
CUDA_ARCHS  := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
HIP_ARCH    ?= gfx906

check-cuda:
	@if ! command -v $(NVCC) >/dev/null; then \
	  echo "check-cuda: skipped (no $(NVCC))"; exit $${PXL_REQUIRE_TOOLCHAINS:-0}; fi; \
	mkdir -p build/cuda; \
	for f in $(CUDA_SRCS); do \
	  echo "nvcc $$f (sm_80, sm_90)"; \
	  $(NVCC) -std=c++17 -O3 -Xcompiler -fPIC $(CUDA_ARCHS) -c $$f -o build/cuda/$$(basename $$f .cu).o || exit 1; \
	done; \
	$(NVCC) -shared $(CUDA_ARCHS) build/cuda/*.o -o build/cuda/libperfxlm_cuda.so || exit 1; \
	echo "check-cuda: $(words $(CUDA_SRCS)) sources compiled for sm_80 and sm_90"

check-hip:
	@if ! command -v $(HIPCC) >/dev/null; then \
	  echo "check-hip: skipped (no $(HIPCC): sh .ci/toolchains.sh)"; exit $${PXL_REQUIRE_TOOLCHAINS:-0}; fi; \
	mkdir -p build/hip; \
	for f in $(CUDA_SRCS); do \
	  echo "hipcc $$f ($(HIP_ARCH))"; \
	  HIP_PLATFORM=amd $(HIPCC) -std=c++17 -O3 -fPIC --offload-arch=$(HIP_ARCH) -x hip -c $$f \
	    -o build/hip/$$(basename $$f .cu).o || exit 1; \
	done; \
	HIP_PLATFORM=amd $(HIPCC) -shared --offload-arch=$(HIP_ARCH) build/hip/*.o -o build/hip/libperfxlm_hip.so || exit 1; \
	echo "check-hip: $(words $(CUDA_SRCS)) sources compiled for $(HIP_ARCH)"
