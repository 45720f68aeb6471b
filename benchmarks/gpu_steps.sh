# Sourced by gpu_check.sh and gpu_check_long.sh: the work folder, steps under a deadline, and what is left in OUT.
#
# The caller sets OUT (what the check leaves: summary.txt and ARCHIVE, nothing else), BUDGET (seconds from the script's
# start by which everything, packing included, has ended) and calls `begin`. Everything a step writes goes to
# $RESULTS (in the work folder, never in $OUT); after every step, and every PACK_EVERY seconds during one, $RESULTS
# is packed into $OUT/$ARCHIVE (atomically: a temporary file in $OUT, then a rename), and summary.txt copied beside it.

KILL_AFTER=5        # seconds between a step's TERM and its KILL
RESERVE=20          # seconds a step leaves before the deadline: the last packing, nvidia-smi (two calls of up to 5 s), the exit
PACK_EVERY=45       # seconds between packings during a step (what a cut-off call returns)
MAX_ARCHIVE=$((15 * 1024 * 1024))   # bytes; a bigger archive is packed again with each file's last MiB only

# begin: the work folder ($WORK, private, removed at exit unless KEEP_WORK=1), $RESULTS, $OUT, the packer.
begin() {
    mkdir -p "$OUT" || exit 1
    OUT=$(cd "$OUT" && pwd)
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/t2f-gpu-check.XXXXXX") || exit 1
    RESULTS=$WORK/results
    FAILED=0
    mkdir -p "$RESULTS"
    : > "$RESULTS/summary.txt"
    ( while sleep "$PACK_EVERY"; do publish; done ) >/dev/null 2>&1 &
    PACKER=$!
    STEP_PID=
    trap finish EXIT
    trap '[ -n "$STEP_PID" ] && kill "$STEP_PID" 2>/dev/null; exit 143' TERM INT
    echo "work folder $WORK; results go to $OUT/summary.txt and $OUT/$ARCHIVE"
}

finish() {
    kill "$PACKER" 2>/dev/null
    wait "$PACKER" 2>/dev/null
    rm -f "$OUT/.$ARCHIVE".*.tmp "$OUT"/.summary.txt.*.tmp      # a packing cut short by the kill
    publish
    cat "$RESULTS/summary.txt"
    [ "${KEEP_WORK:-0}" = 1 ] || rm -rf "$WORK"
}

# publish: $RESULTS packed into $OUT/$ARCHIVE and summary.txt copied beside it, each replaced atomically.
publish() {
    local tmp="$OUT/.$ARCHIVE.$BASHPID.tmp" summary="$OUT/.summary.txt.$BASHPID.tmp" trimmed rc
    cp "$RESULTS/summary.txt" "$summary" && mv -f "$summary" "$OUT/summary.txt"
    tar -czf "$tmp" -C "$WORK" results 2>/dev/null
    rc=$?                                           # 1: a file changed while it was read; the archive is whole
    if [ "$rc" -le 1 ] && [ "$(stat -c %s "$tmp")" -gt "$MAX_ARCHIVE" ]; then
        trimmed=$WORK/trimmed.$BASHPID
        rm -rf "$trimmed" && mkdir -p "$trimmed/results"
        for f in "$RESULTS"/*; do tail -c 1048576 "$f" > "$trimmed/results/$(basename "$f")"; done
        tar -czf "$tmp" -C "$trimmed" results 2>/dev/null
        rc=$?
        rm -rf "$trimmed"
    fi
    if [ "$rc" -le 1 ]; then mv -f "$tmp" "$OUT/$ARCHIVE"; else rm -f "$tmp"; fi
}

# step NAME SECONDS COMMAND...: COMMAND under `timeout` for at most SECONDS, fewer where the deadline is nearer;
# its output into $RESULTS/NAME.log (and standard output); "NAME rc=RC seconds=S limit=L" into summary.txt
# (rc 124: it hit its limit; "skipped": no time left); FAILED=1 unless it ran and exited 0. Then everything is
# published.
step() {
    local name=$1 limit=$2 left start rc
    shift 2
    left=$((BUDGET - SECONDS - KILL_AFTER - RESERVE))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        echo "$name rc=skipped seconds=0 limit=0 (the deadline is near)" | tee -a "$RESULTS/summary.txt"
        FAILED=1
        publish
        return
    fi
    echo "== $name (limit ${limit}s): $*" | tee "$RESULTS/$name.log"
    start=$(date +%s.%N)
    timeout --kill-after="$KILL_AFTER" "$limit" "$@" > >(tee -a "$RESULTS/$name.log") 2>&1 &
    STEP_PID=$!                                     # a TERM to this script stops the step (timeout passes it on)
    wait "$STEP_PID"
    rc=$?
    STEP_PID=
    [ "$rc" = 0 ] || FAILED=1
    echo "$name rc=$rc seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') limit=$limit" \
        | tee -a "$RESULTS/summary.txt"
    publish
}

# hide_modules DIR NAME...: make `import NAME` fail (ModuleNotFoundError) for every Python started after this, by a
# package of that name in DIR put first on PYTHONPATH; the CPU dry run hides what a GPU machine may lack.
hide_modules() {
    local dir=$1 name
    shift
    for name in "$@"; do
        mkdir -p "$dir/$name"
        printf 'raise ModuleNotFoundError("No module named %s (hidden by the dry run)", name=%s)\n' \
            "'$name'" "'$name'" > "$dir/$name/__init__.py"
    done
    export PYTHONPATH=$dir${PYTHONPATH:+:$PYTHONPATH}
}

# gpu_state FILE: the GPU, its clocks, power, temperature and throttle reasons as nvidia-smi reads them now.
gpu_state() {
    {
        date -u +%Y-%m-%dT%H:%M:%SZ
        timeout 5 nvidia-smi --query-gpu=name,pci.bus_id,driver_version,memory.total,pstate,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,temperature.gpu,power.draw,power.limit --format=csv
        timeout 5 nvidia-smi -q -d CLOCK,PERFORMANCE,POWER,TEMPERATURE
    } > "$1" 2>&1 || true
}

# install_site: into $SITE (which the caller puts first on PYTHONPATH), the wheels in $WHEELS if given (with pip
# --no-index: for open_clip_torch, ftfy and wcwidth where the machine lacks them), else the packages named in $COPY_MODULES copied
# from this Python's own site (the dry run's stand-in for wheels), then a copy of this checkout's t2f laid out as
# setup.py's package_dir installs it (no build step, nothing written into the checkout or the Python); the versions
# into $RESULTS/env.txt. Fails where t2f would be imported from anywhere else: the steps run in a folder of their own,
# never in the checkout (whose t2f/ would come first on sys.path, without t2f.engine).
install_site() {
    set -e
    mkdir -p "$SITE"
    if [ -n "${WHEELS:-}" ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl
    fi
    if [ -z "${WHEELS:-}" ] && [ -n "${COPY_MODULES:-}" ]; then
        for m in $COPY_MODULES; do
            cp -r "$(PYTHONPATH='' "$PY" -c "import $m, os; print(os.path.dirname($m.__file__))")" "$SITE/"
        done
    fi
    rm -rf "$SITE/t2f"
    "$PY" - "$ROOT" "$SITE" <<'PYTHON'
import ast, os, shutil, sys
root, site = sys.argv[1:]                       # setup.py's package_dir, parents first: t2f, then t2f.cli, t2f.engine, ...
folders = next(ast.literal_eval(k.value) for k in ast.walk(ast.parse(open(os.path.join(root, "setup.py")).read()))
               if isinstance(k, ast.keyword) and k.arg == "package_dir")
for name, folder in sorted(folders.items(), key=lambda item: item[0].count(".")):
    target = os.path.join(site, *name.split("."))
    if not os.path.exists(target):             # a nested package comes with its parent's folder
        shutil.copytree(os.path.join(root, folder), target)
PYTHON
    mkdir -p "$SITE/bin"                            # setup.py's console scripts, as pip writes them (PATH has $SITE/bin)
    "$PY" - "$ROOT/setup.py" "$SITE/bin" "$PY" <<'PYTHON'
import os, re, sys
setup, bin_dir, python = sys.argv[1:]
for name, module, function in re.findall(r'"([\w-]+)=([\w.]+):(\w+)"', open(setup).read()):
    path = os.path.join(bin_dir, name)
    with open(path, "w") as f:
        f.write(f"#!{python}\nimport sys\nfrom {module} import {function}\nsys.exit({function}())\n")
    os.chmod(path, 0o755)
PYTHON
    "$PY" - "$SITE" > "$RESULTS/env.txt" <<'PYTHON'
import os, platform, subprocess, sys, time
import torch, t2f, t2f.engine
site = os.path.realpath(sys.argv[1])
print("date", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
print("python", platform.python_version(), "on", platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available(), *(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
for name in ("triton", "open_clip", "onnxruntime"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"))
    except ImportError as e:
        print(name, "not importable:", e)
print("t2f", t2f.__version__, "from", os.path.dirname(t2f.__file__), "and", os.path.dirname(t2f.engine.__file__))
try:
    commit = subprocess.run(["git", "-C", os.environ["ROOT"], "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    commit = ""
print("checkout", os.environ["ROOT"], commit or "(not a git checkout here)")
if not os.path.realpath(t2f.engine.__file__).startswith(site + os.sep):
    sys.exit(f"t2f is imported from {t2f.engine.__file__}, not from {site}: another install shadows this checkout's")
import open_clip  # noqa: E402,F401  (every step needs it: the set-up fails here where the wheels were missing)
PYTHON
    cat "$RESULTS/env.txt"
}
