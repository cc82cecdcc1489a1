#!/usr/bin/env python3
"""Rewrite the generated tables and figures of README.md and docs/ from the results files they
name (--check: fail if any differs)."""

from comflp.cli import main
from comflp.report.docs import DocsSettings, docs

if __name__ == "__main__":
    main(DocsSettings, docs, __doc__)
