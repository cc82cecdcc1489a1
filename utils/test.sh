#!/usr/bin/env bash
# The tests, from a fresh clone: set up both environments, then the main suite in .venv and the
# ESPnet2 tests (marker espnet, all end to end on tiny models) in .venv-espnet; each run lists
# its ten slowest tests. Extra arguments go to the main run, e.g. utils/test.sh -x; the quick
# unit run is
#   .venv/bin/python -m pytest -m "not e2e"
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/utils/setup.sh" --dev --espnet
cd "$root"
.venv/bin/python -m pytest -q --durations=10 "$@"
.venv-espnet/bin/python -m pytest -q --durations=10 -m espnet tests/test_espnet.py
