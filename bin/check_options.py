#!/usr/bin/env python3
"""run.sh's closed-set options against their registries, before any job starts (one line and
exit status 1 for a name that is not there)."""

from comflp.cli import main
from comflp.stages.preflight import PreflightSettings, preflight

if __name__ == "__main__":
    main(PreflightSettings, preflight, __doc__)
