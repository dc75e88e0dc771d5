#!/bin/sh
# A riscv64 Python sysroot from Debian trixie's packages: what a RISC-V board's Debian gives
# perfxlm's torch-free runtime (numpy, onnx, regex, jinja2, safetensors, the server's packages),
# for running the `rvv` plugin, the engine and the server under qemu-user
# (../shared/notes/rvv_toolchain.md §5). apt resolves the dependencies with a private
# configuration and an empty package database, downloads them, and dpkg-deb unpacks them:
# nothing is installed on the host, no maintainer script runs.
# Usage: riscv/sysroot.sh DIR   (idempotent: kept while DIR/.packages lists the same packages)
set -eu
S=$(realpath -m "${1:-build/rv64-sysroot}")
PACKAGES="python3.13-minimal python3-numpy libopenblas0-pthread python3-onnx python3-regex python3-jinja2
  python3-safetensors python3-fastapi python3-uvicorn python3-sentencepiece python3-tqdm python3-prometheus-client
  python3-msgspec python3-pydantic libomp-dev"
[ -x "$S/usr/bin/python3.13" ] && [ "$(cat "$S/.packages" 2>/dev/null)" = "$PACKAGES" ] && {
  echo "sysroot: $S (cached)"; exit 0; }
rm -rf "$S"
W=$(mktemp -d)
mkdir -p "$W/lists/partial" "$W/cache/archives/partial" "$S"
cat > "$W/sources" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Architectures: riscv64
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
: > "$W/status"
cat > "$W/apt.conf" <<CONF
Dir::Etc::SourceList "/dev/null";
Dir::Etc::SourceParts "$W/parts";
Dir::State::Lists "$W/lists";
Dir::State::status "$W/status";
Dir::Cache "$W/cache";
APT::Architecture "riscv64";
APT::Architectures { "riscv64"; };
CONF
mkdir -p "$W/parts" && cp "$W/sources" "$W/parts/trixie-riscv64.sources"
export APT_CONFIG="$W/apt.conf"
apt-get -o APT::Sandbox::User=root update -qq
# shellcheck disable=SC2086  # PACKAGES is a word list
apt-get -o APT::Sandbox::User=root install -qq --download-only --no-install-recommends -y $PACKAGES
for d in "$W"/cache/archives/*.deb; do dpkg-deb -x "$d" "$S"; done
[ -e "$S/lib" ] || ln -s usr/lib "$S/lib"
L="$S/usr/lib/riscv64-linux-gnu"
for f in libblas.so.3 liblapack.so.3 libopenblas.so.0; do
  [ -e "$L/$f" ] || ln -s "openblas-pthread/$f" "$L/$f"
done
rm -rf "$W"
echo "$PACKAGES" > "$S/.packages"
echo "sysroot: $S ($(ls "$S/usr/lib/python3/dist-packages" | grep -vc dist-info) Python packages)"
