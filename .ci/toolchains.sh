#!/bin/sh
# Debian packages for the optional kernel targets: clang-16 + riscv64 cross libc + qemu-user-static
# (make test-rvv), qemu-user (the dynamic qemu that loads the instruction-counting plugin of
# make count-rvv), hipcc (make check-hip). nvcc (check-cuda) comes with the machine.
# chromium + chromium-driver: the headless browser of tests/test_chat_page.py (selenium drives it).
# Without root or apt it says what is missing and goes on: those targets and tests then skip.
PKGS="clang-16 gcc-riscv64-linux-gnu libc6-dev-riscv64-cross qemu-user-static qemu-user hipcc chromium chromium-driver"
missing=""
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing \
    >/dev/null && exit 0
fi
echo "toolchains: could not install:$missing (the make targets and tests that need them will skip)" >&2
exit 0
