"""benchmarks/gpu_check.sh's shell logic, on this CPU: its dry run passes with what the GPU image lacks hidden, and
what it leaves in $OUT stays small enough to copy off any machine: at most 8 files, none deeper than two folders, 16 MiB each."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["0-setup", "1-tests-gpu", "2-parity-1024", "3-bench-1024", "4-first-image-cudagraph", "5-first-image-compile-cold",
         "6-first-image-compile-warm", "7-compile-1024"]


@pytest.mark.slow
def test_the_gpu_checks_dry_run_passes_and_returns_few_small_files(tmp_path):
    """Minutes: the whole check on the tiny models, Inductor's compiles on the CPU included."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, TMPDIR=str(tmp_path))
    env.pop("WHEELS", None)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-dry-run", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1800)
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [line.split()[0] for line in summary.splitlines()] == STEPS and all(" rc=0 " in line for line in summary.splitlines())
    files = [p for p in out.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["summary.txt", "t2f-gpu-check.tar.gz"]         # at most 8
    assert all(len(p.relative_to(out).parts) <= 3 and p.stat().st_size < 16 * 2**20 for p in files)
    with tarfile.open(out / "t2f-gpu-check.tar.gz") as archive:
        names = set(archive.getnames())
        env_txt = archive.extractfile("results/env.txt").read().decode()
    assert {f"results/{step}.log" for step in STEPS} <= names
    assert {"results/summary.txt", "results/env.txt", "results/2-parity-1024.json", "results/3-bench-1024.json",
            "results/3-bench-1024.md", "results/7-compile-1024.json", "results/7-compile-1024.md"} <= names
    assert "torch " in env_txt and "t2f 0" in env_txt                     # versions, and t2f from the check's own copy
    assert not list(tmp_path.glob("t2f-gpu-check.*"))                     # the work folder is gone
