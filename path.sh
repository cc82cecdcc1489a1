# Puts comflp's virtual environment first on PATH (sourced by run.sh, which sets it up first).
comflp_root=${comflp_root:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
export PATH="$comflp_root/.venv/bin:$comflp_root/utils:$PATH"
export PYTHONUNBUFFERED=1
