#!/usr/bin/env bash
# The README's first command: install, start a local Ray head (token auth, dashboard), submit the
# demo with `ray job submit`, wait for it, and print the dashboard URL, run directory and reward.
#
#   scripts/quickstart.sh [key=value ...]       # extra config overrides go to the job
#
# Environment: RAYLIGN_VENV (default .venv), RAYLIGN_CONFIG (preset or YAML, default demo),
# RAYLIGN_DASHBOARD_PORT (default 8265), RAYLIGN_SKIP_INSTALL=1 (reuse the environment as it is),
# RAYLIGN_STOP_RAY=1 (stop the Ray head at the end; by default it stays up for the dashboard).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv=${RAYLIGN_VENV:-.venv}
config=${RAYLIGN_CONFIG:-demo}
port=${RAYLIGN_DASHBOARD_PORT:-8265}
[ "${RAYLIGN_SKIP_INSTALL:-0}" = 1 ] || scripts/install.sh cpu
case "$venv" in /*) ;; *) venv="$PWD/$venv" ;; esac
export PATH="$venv/bin:$PATH"

# Ray's Jobs API runs whatever code it is sent: keep token authentication on.
export RAY_AUTH_MODE=token
[ -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ] || ray get-auth-token --generate >/dev/null
if ! ray status >/dev/null 2>&1; then
  echo "[quickstart] starting a local Ray head (dashboard on 127.0.0.1:$port)"
  ray start --head --dashboard-host 127.0.0.1 --dashboard-port "$port" --disable-usage-stats >/dev/null
fi
[ "${RAYLIGN_STOP_RAY:-0}" = 1 ] && trap 'ray stop >/dev/null 2>&1 || true' EXIT
dashboard="http://127.0.0.1:$port"

name="quickstart-$(date +%Y%m%d-%H%M%S)"
runs="$PWD/runs"
echo "[quickstart] submitting $config as job $name"
ray job submit --address "$dashboard" --submission-id "$name" \
  --working-dir . \
  --runtime-env-json '{"excludes": [".venv", "runs", ".git", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache"]}' \
  -- python -m orchestration.train --config "$config" logging.root="$runs" logging.name="$name" \
  logging.progress_bar=false "$@"

summary="$runs/$name/summary.json"
python - "$summary" "$dashboard" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"dashboard:      {sys.argv[2]} (it asks for the cluster's token: paste what "
      "`ray get-auth-token` prints; with this venv active, or .venv/bin/ray get-auth-token)")
print(f"run directory:  {s['run_dir']}")
print(f"logs:           {s['run_dir']}/logs/ (each actor's whole output)")
print(f"report:         {s['run_dir']}/report.html (plots and sample responses)")
print(f"final reward:   {s['reward_last']:.3f} (mean of the last 5 iterations; first 5: "
      f"{s['reward_first']:.3f}) after {s['iterations']} iterations, {s['wall_time_s']:.0f} s")
PY
