#!/usr/bin/env bash
# The tests, from a fresh clone: set up both environments, then the main suite in .venv and the
# ESPnet2 tests (marker espnet, all end to end on tiny models) in .venv-espnet; each run lists
# its ten slowest tests. Both run one pytest-xdist worker per core this shell may use, each
# worker kept to its own core (tests/conftest.py): most of a test's time is its jobs' imports,
# one core each. The main run hands out whole files (a file's fixtures are made once); the
# ESPnet run single tests (one file, one long test), beside the main run, its output shown
# after: each suite's fixtures and longest test leave a core idle that the other then uses.
# Extra arguments go to the main run, e.g. utils/test.sh -x; the quick unit run is
#   .venv/bin/python -m pytest -m "not e2e"
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/utils/setup.sh" --dev --espnet
cd "$root"
workers=$(nproc)
espnet_tmp=$(mktemp -d)  # its log and its own pytest temporary directory
.venv-espnet/bin/python -m pytest -q --durations=10 -n "$workers" --dist load -m espnet \
  --basetemp "$espnet_tmp/pytest" tests/test_espnet.py >"$espnet_tmp/log" 2>&1 &
espnet=$!
trap 'kill "$espnet" 2>/dev/null || true; rm -rf "$espnet_tmp"' EXIT
main_status=0 espnet_status=0
.venv/bin/python -m pytest -q --durations=10 -n "$workers" --dist loadfile "$@" || main_status=$?
wait "$espnet" || espnet_status=$?
echo "---- the ESPnet2 tests (.venv-espnet, run beside the main suite) ----"
cat "$espnet_tmp/log"
[ "$main_status" -eq 0 ] || exit "$main_status"
exit "$espnet_status"
