#!/usr/bin/env bash
# Builds .dev312/site312.tar.xz here: Ray, MLflow, DeepSpeed, pydantic... for the lent GPU machine's
# Python 3.12, as one xz archive under the device tool's 64 MiB limit (the Ray wheel alone is 79 MB;
# without its Java jars, RLlib and Ray LLM, and xz-compressed, everything is 47 MB).
set -euo pipefail
PY312=${PY312:-python3.12}
work=$(mktemp -d)
$PY312 -m pip download -q --no-deps --only-binary=:all: -d "$work/wheels" -r bench/device/wheels.txt
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w "$work/wheels" deepspeed==0.19.8
$PY312 -m pip install -q --no-deps --no-compile --target "$work/site" "$work"/wheels/*.whl
rm -rf "$work"/site/ray/{jars,rllib,llm} "$work"/site/ray/dashboard/client/build/static/js/*.map
mkdir -p .dev312
tar -C "$work/site" -cf - . | xz -9 -T2 > .dev312/site312.tar.xz
rm -rf "$work"
ls -l .dev312/site312.tar.xz
