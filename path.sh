# Puts comflp's virtual environment first on PATH (sourced by run.sh and the recipes).
comflp_root=${comflp_root:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
"$comflp_root/utils/setup.sh" --quiet
export PATH="$comflp_root/.venv/bin:$comflp_root/utils:$PATH"
export PYTHONUNBUFFERED=1
