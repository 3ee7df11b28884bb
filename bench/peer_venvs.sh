#!/usr/bin/env bash
# The bench-only virtual environments of bench/peer_bench.py's peers, never project dependencies:
#   .cache/peers/infinity        infinity-emb[server,torch] + pillow + aiohttp beside the CPU torch 2.13.0
#                                (not [vision]: it brings colpali-engine, whose torch<2.9 pin pulls a CUDA torch 2.8.0,
#                                7 GB; infinity's CLIP path needs only transformers and pillow)
#   .cache/peers/clip-retrieval  clip-retrieval beside torch 2.14.1 + torchvision 0.29.1 and setuptools<70
# Each is built once (a .installed stamp); where pip cannot build one, its last error line goes to
# <venv>/UNAVAILABLE and the bench reports that peer with the reason and its published figures.
#
#   bash bench/peer_venvs.sh                 # both
#   bash bench/peer_venvs.sh infinity        # one
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PEERS=.cache/peers

build() {  # name, then one pip argument list per step, separated by ';;'
  local name=$1; shift
  local venv=$PEERS/$name log=$PEERS/$name/pip.log
  if [ -f "$venv/.installed" ]; then echo "$name: ready ($venv)"; return 0; fi
  mkdir -p "$venv" && rm -f "$venv/UNAVAILABLE"
  { test -x "$venv/bin/python" || "$PYTHON" -m venv "$venv"; } > "$log" 2>&1 || { fail "$name"; return 1; }
  local step=()
  for arg in "$@" ';;'; do
    if [ "$arg" = ';;' ]; then
      echo "$name: pip install ${step[*]}" | tee -a "$log"
      "$venv/bin/python" -m pip install --quiet "${step[@]}" >> "$log" 2>&1 || { fail "$name"; return 1; }
      step=()
    else
      step+=("$arg")
    fi
  done
  touch "$venv/.installed"
  echo "$name: ready ($venv)"
}

fail() {
  grep -v -e '^WARNING' -e '^\s*$' "$PEERS/$1/pip.log" | tail -n 1 > "$PEERS/$1/UNAVAILABLE"
  echo "$1: UNAVAILABLE: $(cat "$PEERS/$1/UNAVAILABLE") (log: $PEERS/$1/pip.log)"
}

want=${*:-infinity clip-retrieval}
for peer in $want; do
  case $peer in
    infinity)
      # aiohttp: infinity 0.0.78 needs it for every image request (base64 included) but no extra names it
      # torch==2.13.0 again in the second step, so nothing there can swap it for a CUDA build
      build infinity torch==2.13.0 ';;' 'infinity-emb[server,torch]==0.0.78' pillow aiohttp torch==2.13.0 ;;
    clip-retrieval)
      # torch 2.14.1 requires setuptools>=77.0.3, so setuptools<70 goes in last, alone (--no-deps)
      build clip-retrieval torch==2.14.1 torchvision==0.29.1 ';;' clip-retrieval==2.45.0 torch==2.14.1 torchvision==0.29.1 \
        ';;' --no-deps 'setuptools<70' ;;
    *) echo "unknown peer: $peer (infinity, clip-retrieval)"; exit 2 ;;
  esac
done
