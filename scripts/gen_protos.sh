#!/usr/bin/env bash
# Generates serving/crosspool/v1/crosspool_pb2{,_grpc}.py(i) from serving/proto with grpcio-tools.
# Usage: scripts/gen_protos.sh [OUT_DIR]   (default: serving/ ; tests pass a temp dir to compare)
# The generated code is committed: the GPU machines have grpcio but no grpcio-tools.
# Post-processing (for older runtimes, protobuf >= 5 and grpcio >= 1.60):
#  - the protobuf runtime-version check protoc adds is removed (it would refuse runtimes older than
#    the protoc that generated the file; the descriptor-builder API used is in protobuf >= 4.21);
#  - the grpc stub's "generated version vs installed grpcio" check is removed for the same reason.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$ROOT/serving}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
mkdir -p "$OUT"
"$PY" -m grpc_tools.protoc -I "$ROOT/serving/proto" \
  --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
  "$ROOT/serving/proto/crosspool/v1/crosspool.proto"
PB="$OUT/crosspool/v1/crosspool_pb2.py"
GRPC="$OUT/crosspool/v1/crosspool_pb2_grpc.py"
"$PY" - "$PB" "$GRPC" <<'PYEOF'
import re
import sys

pb, grpc_file = sys.argv[1], sys.argv[2]
s = open(pb).read()
s = s.replace("from google.protobuf import runtime_version as _runtime_version\n", "")
s = re.sub(r"_runtime_version\.ValidateProtobufRuntimeVersion\(\n(?:.*\n)*?\)\n", "", s)
open(pb, "w").write(s)
g = open(grpc_file).read()
# absolute import of the sibling module (protoc writes `from crosspool.v1 import ...`)
g = g.replace("from crosspool.v1 import crosspool_pb2", "from serving.crosspool.v1 import crosspool_pb2")
g = re.sub(r"\nGRPC_GENERATED_VERSION = .*?\n(?=\n\nclass )", "\n", g, flags=re.S)
open(grpc_file, "w").write(g)
PYEOF
touch "$OUT/crosspool/__init__.py" "$OUT/crosspool/v1/__init__.py"
