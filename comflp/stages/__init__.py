"""One module per stage of run.sh: its typed settings and the one function its ``bin/`` entry
point calls (docs/DESIGN.md, "Stages")."""
