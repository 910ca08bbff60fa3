#!/usr/bin/env bash
# The deployment, for real: lint the images, build them, bring the compose stack up healthy, send
# requests through nginx to every endpoint, run locust for 30 s while one replica restarts, and
# require zero failed requests. Run inside ../shared/docker/with-docker.sh (CI does).
#   usage: deploy/ci-stack.sh PYTHON      (a Python with the project's dev and load extras)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
PORT=${NEUROSERVE_HTTP_PORT:-8080}
export NEUROSERVE_HTTP_PORT=$PORT
say() { echo "[stack] +${SECONDS}s $*"; }
cleanup() {
  say "logs (tail) and teardown"
  docker compose logs --tail 20 neuroserve-2 nginx 2>/dev/null || true
  docker compose down -v --remove-orphans >/dev/null 2>&1 || true
}
trap cleanup EXIT

say "hadolint"
hadolint Dockerfile Dockerfile.gpu deploy/nginx/Dockerfile
say "compose files (all profiles) validate"
docker compose --profile gpu --profile monitoring config -q
say "build"
docker compose build -q
say "up, waiting for health"
docker compose up -d --wait --wait-timeout 180
say "endpoint checks through nginx"
"$PY" deploy/smoke.py "http://127.0.0.1:$PORT"

say "locust 30 s, restarting neuroserve-2 after 10 s"
rm -f loadtest_stats.csv loadtest_failures.csv
"$PY" -m locust -f locustfile.py --headless -u 24 -r 8 -t 30s --host "http://127.0.0.1:$PORT" \
  --csv loadtest --html loadtest.html --only-summary > loadtest.log 2>&1 &
locust_pid=$!
sleep 10
docker compose restart -t 30 neuroserve-2
say "neuroserve-2 restarted"
wait "$locust_pid" || true
cat loadtest.log | tail -25
"$PY" - <<'PY'
import csv, sys
rows = list(csv.DictReader(open("loadtest_stats.csv")))
total = next(r for r in rows if r["Name"] == "Aggregated")
requests, failures = int(total["Request Count"]), int(total["Failure Count"])
print(f"locust: {requests} requests, {failures} failures, {float(total['Requests/s']):.1f} req/s")
sys.exit(0 if requests > 100 and failures == 0 else "load test failed")
PY
say "stack passed"
