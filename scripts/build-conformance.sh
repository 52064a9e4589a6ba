#!/usr/bin/env bash
# Builds the OCI distribution-spec conformance suite (a Go test binary) into .tools/conformance.test.
# The module has no release tags, so it is pinned by pseudo-version.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=v0.0.0-20260831232431-97274622c111
OUT=.tools/conformance.test
STAMP=.tools/conformance.version
if [ -x "$OUT" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$VERSION" ]; then exit 0; fi
mkdir -p .tools/conformance-src
cd .tools/conformance-src
cat > go.mod <<MOD
module ocicache-conformance-build

go 1.24
MOD
go get "github.com/opencontainers/distribution-spec/conformance@${VERSION}"
go test -c github.com/opencontainers/distribution-spec/conformance -o ../conformance.test
echo "$VERSION" > ../conformance.version
