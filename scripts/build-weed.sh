#!/usr/bin/env bash
# Builds SeaweedFS (`weed`, a real S3-compatible server for the object-storage tests) into
# .tools/weed from its Go module. `go install` refuses the module (it has replace directives), so
# the module is downloaded, copied somewhere writable and built in place (about 4 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=v0.0.0-20261109003541-7506e5f91cd6
OUT=.tools/weed
STAMP=.tools/weed.version
if [ -x "$OUT" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$VERSION" ]; then exit 0; fi
mkdir -p .tools
DIR=$(go mod download -json "github.com/seaweedfs/seaweedfs@${VERSION}" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
[ -d "$DIR" ] || { echo "build-weed: go mod download gave no module directory" >&2; exit 1; }
SRC=.tools/weed-src
rm -rf "$SRC"
cp -r "$DIR" "$SRC"
chmod -R u+w "$SRC"
(cd "$SRC" && go build -o "../weed" ./weed)
rm -rf "$SRC"
echo "$VERSION" > "$STAMP"
