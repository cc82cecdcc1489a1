#!/usr/bin/env bash
# The tests, from a fresh clone: set up both environments, then the main suite in .venv and the
# ESPnet2 tests (marker espnet, all end to end on tiny models) in .venv-espnet; each run lists
# its ten slowest tests. Both run one pytest-xdist worker per core this shell may use, each
# worker kept to its own core (tests/conftest.py): most of a test's time is its jobs' imports,
# one core each. The main run hands out whole files (a file's fixtures are made once); the
# ESPnet run single tests (one file, one long test). Extra arguments go to the main run, e.g.
# utils/test.sh -x; the quick unit run is
#   .venv/bin/python -m pytest -m "not e2e"
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/utils/setup.sh" --dev --espnet
cd "$root"
workers=$(nproc)
.venv/bin/python -m pytest -q --durations=10 -n "$workers" --dist loadfile "$@"
.venv-espnet/bin/python -m pytest -q --durations=10 -n "$workers" --dist load -m espnet tests/test_espnet.py
