#!/usr/bin/env bash
# Regenerates the committed Python stubs in client/v1 from protos/agentplane/v1.
# Usage: scripts/gen_protos.sh [OUT_DIR]   (default: client/v1)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
out=${1:-client/v1}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m grpc_tools.protoc -I protos \
  --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
  protos/agentplane/v1/*.proto
mkdir -p "$out"
rm -f "$out"/*_pb2.py "$out"/*_pb2.pyi "$out"/*_pb2_grpc.py
cp "$tmp"/agentplane/v1/* "$out"/
cat > "$out/__init__.py" <<'PY'
"""Generated gRPC stubs for agentplane.v1 (by `make proto`; never edit by hand)."""
PY
