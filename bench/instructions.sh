#!/bin/sh
# Instructions one create costs the gateway, counted by callgrind (repeatable on a busy machine, unlike
# wall-clock): bench/inprocess.py runs SMALL then LARGE creates, and the difference divided by LARGE - SMALL
# leaves out start-up and warm-up. Printed for the event-loop thread and for the whole process: the SQLite
# writer thread's share moves with how its batches happen to fall, so compare the event-loop figure first.
# Needs valgrind; each run takes a minute or two.
#
#     bench/instructions.sh [SMALL [LARGE]]      (default 320 and 1280, 32 at a time)
set -eu
cd "$(dirname "$0")/.."
small=${1:-320}
large=${2:-1280}
python=${PYTHON:-$(python3 -c "import sys; print(sys.executable)")}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# count N: "<event-loop thread> <all threads>" instructions of one run of N creates
count() {
    valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$work/cg.$1" --dump-instr=no \
        --collect-jumps=no "$python" bench/inprocess.py --creates "$1" --concurrency 32 2>"$work/log" >/dev/null
    loop=$(sed -n 's/^totals: \([0-9]*\).*/\1/p' "$work/cg.$1-01")
    all=$(sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$work/log")
    echo "$loop $all"
}
set -- $(count "$small") $(count "$large")
echo "per create: $(( ($3 - $1) / (large - small) )) instructions on the event loop," \
     "$(( ($4 - $2) / (large - small) )) in all"
