# Sourced by gpu_check.sh and gpu_check_long.sh (needs $OUT): one step of a device check, and hiding modules.

# hide_modules DIR NAME...: make `import NAME` fail (ModuleNotFoundError) for every Python started after this, by a
# package of that name in DIR put first on PYTHONPATH; the CPU dry run hides what the GPU image lacks.
hide_modules() {
    local dir=$1 name
    shift
    for name in "$@"; do
        mkdir -p "$dir/$name"
        printf 'raise ModuleNotFoundError("No module named %s (hidden: the GPU image lacks it)", name=%s)\n' \
            "'$name'" "'$name'" > "$dir/$name/__init__.py"
    done
    export PYTHONPATH=$dir${PYTHONPATH:+:$PYTHONPATH}
}

# step NAME SECONDS COMMAND...: run under `timeout`, tee into $OUT/NAME.log, record rc and time in $OUT/summary.txt
step() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$OUT/summary.txt"
}
