#!/bin/sh
# qemu's plugin API header (include/qemu/qemu-plugin.h) for building insn_count.c: Debian ships
# no qemu plugin headers, so apt fetches the source package of the installed qemu-user (checked
# against the signed archive, as any apt download) with a private configuration, and only that
# header is unpacked from it: nothing is installed, /etc/apt is left alone. About 24 MB, once.
# Usage: riscv/qemu_plugin/plugin_header.sh OUT.h
set -eu
OUT=$1
[ -s "$OUT" ] && { echo "qemu-plugin.h: $OUT (cached)"; exit 0; }
command -v apt-get >/dev/null || { echo "qemu-plugin.h: needs apt-get (Debian) to fetch qemu's source" >&2; exit 1; }
# the source version of the qemu-user the plugin will be loaded into (its API version must match)
VERSION=$(dpkg-query -W -f '${source:Version}' qemu-user 2>/dev/null) ||
  { echo "qemu-plugin.h: qemu-user is not installed (apt-get install qemu-user)" >&2; exit 1; }
SUITE=$(. /etc/os-release && echo "$VERSION_CODENAME")
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
mkdir -p "$W/lists/partial" "$W/cache/archives/partial" "$W/parts"
for s in "$SUITE" "$SUITE-updates"; do
  cat >> "$W/parts/src.sources" <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: $s
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

SRC
done
cat >> "$W/parts/src.sources" <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
: > "$W/status"
cat > "$W/apt.conf" <<CONF
Dir::Etc::SourceList "/dev/null";
Dir::Etc::SourceParts "$W/parts";
Dir::State::Lists "$W/lists";
Dir::State::status "$W/status";
Dir::Cache "$W/cache";
CONF
export APT_CONFIG="$W/apt.conf"
apt-get -o APT::Sandbox::User=root update -qq
# the installed version where the archive still has it, else the suite's current one (same upstream)
(cd "$W" && { apt-get -o APT::Sandbox::User=root source --download-only -qq "qemu=$VERSION" 2>/dev/null ||
  apt-get -o APT::Sandbox::User=root source --download-only -qq qemu; })
ORIG=$(ls "$W"/qemu_*.orig.tar.* | head -n 1)
MEMBER=$(tar -tf "$ORIG" | grep '/include/qemu/qemu-plugin\.h$' | head -n 1)
tar -xf "$ORIG" -C "$W" "$MEMBER"
mkdir -p "$(dirname "$OUT")"
cp "$W/$MEMBER" "$OUT"
echo "qemu-plugin.h: $OUT (from $(basename "$ORIG"))"
