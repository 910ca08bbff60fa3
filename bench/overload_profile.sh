#!/usr/bin/env bash
# Where the interpreter lock goes under overload: py-spy (GIL holders only, per thread, raw stacks)
# of `python -m service serve` on the committed models while wrk sends translation requests from C
# connections that pause 0.1 s after a 429 (bench/backoff.lua, as bench.overload does).
#
#   bash bench/overload_profile.sh 64 && bash bench/overload_profile.sh 1024   # -> /tmp/prof-C.txt
#
# Each line of the output is "thread;frame;...;frame COUNT" (py-spy's raw format, 200 samples a
# second for 14 s); the wrk summary line (WRK_JSON) says what was served meanwhile.
set -u
C=${1:?connections}
OUTF=${OUTF:-/tmp/prof-$C.txt}
cd "$(dirname "$0")/.."
PORT=${PORT:-18123}
PY=${PY:-.venv/bin/python}
NEUROSERVE_REPOSITORY=models NEUROSERVE_PORT=$PORT NEUROSERVE_ACCESS_LOG=false NEUROSERVE_LOG_LEVEL=warning \
  "$PY" -m service serve > /tmp/prof-server.log 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null' EXIT
for _ in $(seq 120); do curl -sf "localhost:$PORT/v2/health/ready" > /dev/null && break; sleep 1; done
BODY=$(mktemp) && echo '{"texts": ["Where is the train station?"]}' > "$BODY"
BODY_FILE=$BODY BACKOFF_MS=100 wrk -t2 -c64 -d3s --timeout 10s -s bench/backoff.lua \
  "http://127.0.0.1:$PORT/v1/translation" > /dev/null
BODY_FILE=$BODY BACKOFF_MS=100 wrk -t2 -c"$C" -d20s --timeout 10s -s bench/backoff.lua \
  "http://127.0.0.1:$PORT/v1/translation" > "/tmp/prof-wrk-$C.txt" &
W=$!
sleep 3
"$(dirname "$PY")/py-spy" record --gil --threads -r 200 -d 14 -f raw -o "$OUTF" -p $PID > /dev/null 2>&1
wait $W
grep WRK_JSON "/tmp/prof-wrk-$C.txt"
