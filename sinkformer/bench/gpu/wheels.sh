#!/usr/bin/env bash
# Python 3.12 x86-64 wheels of what a bare GPU machine's Python lacks (it has jax, flax, optax,
# orbax, numpy, scipy, sentencepiece, pytest): the versions requirements.txt pins, for
# `sinkformer/bench/gpu/check.py STAGE --wheels DIR`. Run where PyPI is reachable.
#   sinkformer/bench/gpu/wheels.sh .whl
set -euo pipefail
out=${1:?usage: sinkformer/bench/gpu/wheels.sh DIR}
cd "$(dirname "$0")/../../.."   # the repo root
pin() { grep -E "^$1==" requirements.txt | cut -d' ' -f1; }
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$out" "$(pin grain)" "$(pin array-record)" "$(pin ml-collections)" "$(pin tensorboardX)" \
  "$(pin psutil)" portpicker==1.6.0 cloudpickle==3.1.2
ls -1 "$out"
