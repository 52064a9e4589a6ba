#!/usr/bin/env bash
# Assembles a local base image for building the Dockerfile without a registry: a debootstrap'd
# Debian bookworm (minbase) with this machine's Node.js and npm, its CA bundle and npm config
# (the npm registry may sit behind a proxy CA here), and the compilers better-sqlite3 needs, as the
# official non-slim Node images have them (the Dockerfile installs them on a slim base itself),
# and npm_config_nodedir=/usr so node-gyp uses the headers copied below instead of downloading
# them (set here, not as a --build-arg: buildah's layer cache misses every step after an ARG given
# a value on the command line). Committed to buildah's local storage as
# localhost/ocicache-test-base:3 (the tag changes with what the base holds); passed to the build
# as --build-arg BASE=... .
set -euo pipefail
IMAGE=localhost/ocicache-test-base:3
if buildah inspect --type image "$IMAGE" >/dev/null 2>&1; then exit 0; fi
work=$(mktemp -d /tmp/ocicache-base-XXXXXX)
trap 'rm -rf "$work"' EXIT
debootstrap --variant=minbase --include=python3,make,g++ bookworm "$work/rootfs" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 \
  || { tail -20 "$work/debootstrap.log"; exit 1; }
root="$work/rootfs"
install -m 0755 "$(command -v node)" "$root/usr/bin/node"
mkdir -p "$root/usr/lib/node_modules" "$root/usr/include" "$root/etc/ssl/certs"
cp -a /usr/lib/node_modules/npm "$root/usr/lib/node_modules/npm"
ln -sf ../lib/node_modules/npm/bin/npm-cli.js "$root/usr/bin/npm"
ln -sf ../lib/node_modules/npm/bin/npx-cli.js "$root/usr/bin/npx"
# Headers for compiling better-sqlite3 (node-gyp cannot download them here).
cp -a /usr/include/node "$root/usr/include/node"
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
for rc in /etc/npmrc /usr/etc/npmrc; do
  if [ -f "$rc" ]; then mkdir -p "$root$(dirname "$rc")"; cp "$rc" "$root$rc"; fi
done
rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
ctr=$(buildah from scratch)
buildah copy "$ctr" "$root" / >/dev/null
buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env npm_config_nodedir=/usr --cmd node "$ctr"
buildah commit --quiet "$ctr" "$IMAGE" >/dev/null
buildah rm "$ctr" >/dev/null
echo "$IMAGE"
