#!/usr/bin/env bash
# The tests, from a fresh clone: set up both environments, then the main suite in .venv and the
# ESPnet2 tests (marker espnet) in .venv-espnet. Extra arguments go to both pytest runs, e.g.
#   utils/test.sh -m "not e2e"        # the quick unit run
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/utils/setup.sh" --dev --espnet
cd "$root"
.venv/bin/python -m pytest -q "$@"
.venv-espnet/bin/python -m pytest -q -m espnet tests/test_espnet.py "$@"
