#!/usr/bin/env bash
# Every GPU figure of the engine in one prepared command (< 8 minutes on one H200), for a
# machine whose Python has jax/flax/optax/orbax but not the rest of requirements.txt:
#   0. install the wheels it is handed (launch/gpu_wheels.sh makes them);
#   1. the fused attention kernel against XLA on the GPU (tests/test_attention.py);
#   2. `bench memory`: per remat policy, memory per micro-batch row at 32 layers, and the
#      largest micro-batch that fits;
#   3. `bench mfu` at all 32 layers at the largest micro-batch of `none` and of `dots`:
#      compile seconds, first step, step time, tokens/s, MFU, NULL/dense;
#   4. a PyTorch peer of the same geometry and depth in the same call (--peer FILE: a script
#      taking `LAYERS compile` and printing tokens/s), for the tokens/s ratio;
#   5. the quickstart trained on the GPU: the fraction of each step spent waiting for data;
#   6. the input pipeline on this host's CPUs: a generated corpus of one-document sources
#      (`bench scale`, 600k of them: the stream's cost per record does not grow with the
#      corpus) streamed in wiki_1b's 1024-token rows, against what the 1B model consumes
#      (step 3's tokens/s).
# Figures go to stdout and, as JSON lines, to $OUT/gpu_check.jsonl (or --out DIR).
#
#   launch/gpu_wheels.sh .whl                         # here, where PyPI is reachable
#   launch/gpu_check.sh --wheels .whl [--peer FILE]   # there
# CONFIG=experiments/quickstart.py:smoke LAYERS=2 runs the same steps on a CPU in a minute.
set -uo pipefail
cd "$(dirname "$0")/.."
wheels="" peer="" out="${OUT:-gpu_check_out}"
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels=$2; shift 2 ;;
    --peer) peer=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "usage: launch/gpu_check.sh [--wheels DIR] [--peer FILE] [--out DIR]" >&2; exit 2 ;;
  esac
done
config=${CONFIG:-experiments/wiki_1b.py} layers=${LAYERS:-32}
python=${PYTHON:-python3}
mkdir -p "$out"
log="$out/gpu_check.jsonl"
: > "$log"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "$wheels" ]; then
  $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/sinkformer-site "$wheels"/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/sinkformer-site"
fi
# JSON line of a command's output -> the log; the command's own lines -> stdout
record() { local name=$1; shift; echo "== $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$out/$name.txt" | grep -v '^{'
  local rc=${PIPESTATUS[0]}
  grep '^{' "$out/$name.txt" | tail -n 1 >> "$log"
  echo "   ($name: exit $rc, $((SECONDS - t0)) s)"; }

$python -c "import jax; print('devices:', jax.devices())"
record attention timeout 150 $python -m pytest -q -p no:cacheprovider tests/test_attention.py
record memory timeout 200 $python -m sinkformer bench memory --config "$config" --rows 4 \
  --config.model.num_layers="$layers" --config.mesh.data=1
best() {  # the largest micro-batch of a policy (at most 16 rows), from the memory figures
  $python - "$log" "$1" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"memory"' in l]
fit = rows[-1]["policies"][sys.argv[2]]["largest_rows_per_device"] if rows else None
print(max(1, min(16, fit or 4)))
PY
}
for remat in none dots; do
  rows=$(best $remat)
  record "mfu_$remat" timeout 240 $python -m sinkformer bench mfu --config "$config" --rounds 5 \
    --config.model.num_layers="$layers" --config.model.remat=$remat --config.mesh.data=1 \
    --config.train.batch_size="$rows" --config.train.grad_accum=1
done
if [ -n "$peer" ]; then
  echo "== peer: $peer $layers compile"
  t0=$SECONDS
  timeout 150 $python "$peer" "$layers" compile 2>&1 | tee "$out/peer.txt"
  $python - "$out/peer.txt" >> "$log" <<'PY'
import json, re, sys
text = open(sys.argv[1]).read()
got = re.findall(r"([\d,.]+)\s*tok(?:ens)?/s", text)
print(json.dumps({"bench": "peer", "tokens_per_s": float(got[-1].replace(",", "")) if got else None}))
PY
  echo "   (peer: $((SECONDS - t0)) s)"
fi
rm -rf /tmp/sinkformer-quickstart
record quickstart timeout 150 $python -m sinkformer train --config experiments/quickstart.py \
  --workdir /tmp/sinkformer-quickstart
$python - /tmp/sinkformer-quickstart/metrics.jsonl >> "$log" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"data_frac"' in l]
rows = rows[1:] or rows   # the first interval holds the compile
print(json.dumps({"bench": "quickstart", "data_frac": sum(r["data_frac"] for r in rows) / len(rows),
                  "tokens_per_s": sum(r["tokens_per_s"] for r in rows) / len(rows)}))
PY
rm -rf /tmp/sinkformer-scale
record scale timeout 150 $python -m sinkformer bench scale --docs "${SCALE_DOCS:-600000}" \
  --dir /tmp/sinkformer-scale
record stream timeout 90 $python -m sinkformer bench stream --data /tmp/sinkformer-scale/prepared \
  --rows 16 --seq_len 1024 --workers 1,2,4
echo "== summary ($log)"
$python - "$log" <<'PY'
import json, sys
got = {}
for line in open(sys.argv[1]):
  r = json.loads(line)
  got[r["bench"] + (f"_{r['remat']}" if r["bench"] == "mfu" else "")] = r
for name, r in got.items():
  if name.startswith("mfu"):
    print(f"{name}: {r['rows']} rows, first step {r['null_compile_s'] + r['null_first_step_s']:.0f} s "
          f"after compile start, NULL MFU {100 * r['null_mfu']:.1f}% ({r['null_tokens_per_s']:,.0f} "
          f"tok/s), dense {100 * r['dense_mfu']:.1f}%, NULL/dense {r['ratio']:.3f}")
  elif name == "memory":
    print("memory: " + ", ".join(f"{p} {v['largest_rows_per_device']} rows"
                                 for p, v in r["policies"].items()))
  elif name == "peer" and r["tokens_per_s"]:
    best = max((v for k, v in got.items() if k.startswith("mfu")),
               key=lambda v: v["null_tokens_per_s"], default=None)
    ratio = best["null_tokens_per_s"] / r["tokens_per_s"] if best else float("nan")
    print(f"peer: {r['tokens_per_s']:,.0f} tok/s; best NULL / peer {ratio:.2f}")
  elif name == "quickstart":
    print(f"quickstart: data wait {100 * r['data_frac']:.1f}% of each step, "
          f"{r['tokens_per_s']:,.0f} tok/s")
  elif name == "scale":
    print(f"scale: prepare of {r['documents']:,} documents {r['prepare_s']:.0f} s, peak RSS "
          f"{r['peak_rss_bytes'] / 2**30:.2f} GiB, resumed late epoch's first batch "
          f"{r['late_epoch_first_batch_s']:.2f} s")
  elif name == "stream":
    best = max(v["tokens_per_s"] for v in r["per_thread_count"].values())
    model = max((v["null_tokens_per_s"] for k, v in got.items() if k.startswith("mfu")),
                default=None)
    print(f"stream: {best:,.0f} tok/s in 16x1024 batches"
          + (f" = {best / model:.1f}x what one GPU trains the 1B model at" if model else ""))
PY
