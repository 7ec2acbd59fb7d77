#!/bin/sh
# Instructions one create costs the gateway's own process, counted by callgrind (repeatable on a busy
# machine, unlike wall-clock): bench/inprocess.py runs SMALL then LARGE creates, and the difference
# divided by LARGE - SMALL leaves out start-up and warm-up. Needs valgrind; each run takes a minute or two.
#
#     bench/instructions.sh [SMALL [LARGE]]      (default 320 and 1280, 32 at a time)
set -eu
cd "$(dirname "$0")/.."
small=${1:-320}
large=${2:-1280}
python=${PYTHON:-$(python3 -c "import sys; print(sys.executable)")}
count() {
    log=$(mktemp)
    valgrind --tool=callgrind --callgrind-out-file=/dev/null --dump-instr=no --collect-jumps=no \
        "$python" bench/inprocess.py --creates "$1" --concurrency 32 2>"$log" >/dev/null
    sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$log"
    rm -f "$log"
}
a=$(count "$small")
b=$(count "$large")
echo "$(( (b - a) / (large - small) )) instructions/create ($small creates: $a, $large creates: $b)"
