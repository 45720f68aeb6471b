# Sourced by gpu_check.sh and gpu_check_long.sh (needs $OUT): one step of a device check.
# step NAME SECONDS COMMAND...: run under `timeout`, tee into $OUT/NAME.log, record rc and time in $OUT/summary.txt
step() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$OUT/summary.txt"
}
