#!/usr/bin/env bash
# The bench-only virtual environment of bench/index_peers.py's ANN peers, never a project dependency:
#   .venv-indexpeers   numpy, faiss-cpu, hnswlib, usearch, autofaiss (git-ignored by .gitignore's `.venv-*/`)
# clipforge's own index is not installed there: `import index` pulls model/, hence torch, so the bench runs
# clipforge's part with .venv/bin/python and each peer with .venv-indexpeers/bin/python, every engine in its own
# subprocess. Built once (a .installed stamp); each package goes in on its own, so one that pip cannot build
# leaves its last error line in .venv-indexpeers/UNAVAILABLE-<name> and the bench reports that peer with it.
#
#   bash bench/index_peers_venv.sh
#   PYTHON=python3.11 bash bench/index_peers_venv.sh
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-indexpeers}  # another path for a trial build
LOG=$VENV/pip.log
if [ -f "$VENV/.installed" ]; then echo "ready ($VENV)"; exit 0; fi
{ test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"; } || { echo "cannot create $VENV"; exit 1; }
: > "$LOG"
failed=0
# autofaiss 2.18 pins numpy<2 while pyarrow (its dependency) does not declare numpy and from 21 on needs
# numpy>=2 ("pyarrow requires NumPy 2.0 or newer, found 1.26.4" at import): pyarrow<21 goes in with it.
for pkg in numpy faiss-cpu hnswlib usearch autofaiss; do
  echo "pip install $pkg" | tee -a "$LOG"
  rm -f "$VENV/UNAVAILABLE-$pkg"
  extra=(); [ "$pkg" = autofaiss ] && extra=("pyarrow<21")
  if ! "$VENV/bin/python" -m pip install --quiet "$pkg" "${extra[@]}" >> "$LOG" 2>&1; then
    grep -v -e '^WARNING' -e '^\s*$' "$LOG" | tail -n 1 > "$VENV/UNAVAILABLE-$pkg"
    echo "$pkg: UNAVAILABLE: $(cat "$VENV/UNAVAILABLE-$pkg") (log: $LOG)"
    failed=1
  fi
done
"$VENV/bin/python" -c "import numpy, faiss, hnswlib, usearch, autofaiss" >> "$LOG" 2>&1 \
  || { echo "import check failed: $(tail -n 1 "$LOG")"; failed=1; }
"$VENV/bin/python" -m pip freeze | grep -i -E '^(numpy|faiss-cpu|hnswlib|usearch|autofaiss|pyarrow)==' | tee "$VENV/versions.txt"
[ "$failed" = 0 ] && touch "$VENV/.installed"
echo "done ($VENV)"
