#!/usr/bin/env bash
# Builds docker-credential-ecr-login (Amazon's ECR credential helper) into .tools/ from its Go
# module, for the test that runs it the way a cache in front of ECR does (test/cloud-credentials.test.ts).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=v0.13.0
OUT=.tools/docker-credential-ecr-login
STAMP=.tools/ecr-login.version
if [ -x "$OUT" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$VERSION" ]; then exit 0; fi
mkdir -p .tools
GOBIN="$PWD/.tools" go install "github.com/awslabs/amazon-ecr-credential-helper/ecr-login/cli/docker-credential-ecr-login@${VERSION}"
echo "$VERSION" > "$STAMP"
