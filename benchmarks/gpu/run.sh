#!/usr/bin/env bash
# The GPU measurement kit, on the GPU machine (offline; a CUDA torch is all it needs installed):
#
#   bash benchmarks/gpu/run.sh [KIT OPTIONS]      # from the checkout, benchmarks/gpu/wheels/ built by wheelhouse.sh
#
# Installs what the machine lacks from the wheelhouse into $SITE, lays dsdkit out there from this checkout, and runs
# kit.py so that the whole command ends within KIT_BUDGET_S seconds (default 480 = 8 minutes: the install's time
# comes off the kit's deadline). The JSON goes to $OUT when that is set (the device tool's folder that comes back,
# with the kit's log beside it), else to benchmarks/results/. KIT OPTIONS go to kit.py (--only, --estimate, ...).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
SITE=${DSDKIT_KIT_SITE:-/tmp/dsdkit-site}
WHEELS=benchmarks/gpu/wheels
budget=${KIT_BUDGET_S:-480}
if [ -n "${OUT:-}" ]; then
  exec 2> >(tee "$OUT/gpu-kit.log" >&2)
fi

rm -rf "$SITE"
mkdir -p "$SITE"
# Only wheels whose distribution this interpreter lacks are installed: the machine's own packages win (its CUDA
# torch above all, and whatever torch and its neighbours were built against), never shadowed by ours. Because
# nothing in $SITE then duplicates an installed distribution, $SITE can go first on PYTHONPATH, which torch's
# compile workers and every other subprocess inherit. (Putting $SITE after site-packages instead would need a .pth
# file in a site-packages folder that may be read-only, and would still unpack wheels the machine has no use for.)
if [ -f "$WHEELS/WHEELHOUSE.json" ]; then
  built_for=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["python_version"])' \
    "$WHEELS/WHEELHOUSE.json")
  here=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ "$built_for" != "$here" ]; then
    echo "run.sh: the wheelhouse was built for CPython $built_for, this is $here: its binary wheels will not" \
      "install (rebuild it where pip works: bash benchmarks/gpu/wheelhouse.sh $here)" >&2
  fi
  mapfile -t missing < <("$PYTHON" benchmarks/gpu/wheelhouse.py missing "$WHEELS")
  if [ -n "${missing[*]}" ]; then
    echo "run.sh: installing ${#missing[@]} wheels the machine lacks: ${missing[*]##*/}" >&2
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${missing[@]}"
  fi
else
  echo "run.sh: no wheelhouse in $WHEELS (build it with benchmarks/gpu/wheelhouse.sh); the machine's packages" \
    "alone must do" >&2
fi
"$PYTHON" benchmarks/gpu/wheelhouse.py layout "$SITE" >/dev/null
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" DSDKIT_KIT_SITE="$SITE" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
deadline=$((budget - SECONDS - 5))
echo "run.sh: set up in ${SECONDS} s; the kit gets ${deadline} s" >&2
# The full-size model goes to a fixed folder: a second run on the same (warm) machine reuses it.
exec "$PYTHON" benchmarks/gpu/kit.py --deadline "$deadline" --out-dir "${OUT:-benchmarks/results}" \
  --model-dir /tmp/dsdkit-kit-model "$@"
