#!/usr/bin/env bash
# Builds helm into .tools/helm from its Go module (no download sites here, only the Go module proxy).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=v3.22.0
OUT=.tools/helm
STAMP=.tools/helm.version
if [ -x "$OUT" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$VERSION" ]; then exit 0; fi
mkdir -p .tools
GOBIN="$PWD/.tools" go install "helm.sh/helm/v3/cmd/helm@${VERSION}"
echo "$VERSION" > "$STAMP"
