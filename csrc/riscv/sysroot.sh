#!/bin/sh
# A riscv64 Python + numpy sysroot from Debian trixie's packages, for running the `rvv`
# plugin under qemu-user (../shared/notes/rvv_toolchain.md §5). Packages are downloaded
# with a private apt configuration and unpacked with dpkg-deb: nothing is installed.
# Usage: riscv/sysroot.sh DIR   (idempotent: an existing DIR/usr/bin/python3 is kept)
set -eu
S=$(realpath -m "${1:-build/rv64-sysroot}")
[ -x "$S/usr/bin/python3.13" ] && { echo "sysroot: $S (cached)"; exit 0; }
W=$(mktemp -d)
mkdir -p "$W/lists/partial" "$W/cache/archives/partial" "$W/debs" "$S"
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
cd "$W/debs"
apt-get -o APT::Sandbox::User=root download -qq libc6 python3.13-minimal libpython3.13-minimal libpython3.13-stdlib libexpat1 zlib1g \
  libssl3t64 libffi8 libbz2-1.0 liblzma5 libgcc-s1 libstdc++6 libgfortran5 libopenblas0-pthread python3-numpy \
  libzstd1 libsqlite3-0 libncursesw6 libtinfo6 libreadline8t64 libuuid1 libmpdec4
for d in *.deb; do dpkg-deb -x "$d" "$S"; done
[ -e "$S/lib" ] || ln -s usr/lib "$S/lib"
L="$S/usr/lib/riscv64-linux-gnu"
for f in libblas.so.3 liblapack.so.3 libopenblas.so.0; do
  [ -e "$L/$f" ] || ln -s "openblas-pthread/$f" "$L/$f"
done
rm -rf "$W"
echo "sysroot: $S"
