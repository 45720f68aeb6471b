"""What a GPU machine may lack: training finishes without matplotlib, its report says why it has no curves.

benchmarks/gpu_check.sh --cpu-dry-run hides the same modules with the same shell function, so a step that
needs one fails on the CPU first; these tests use that function too.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def hidden(tmp_path, command: str) -> subprocess.CompletedProcess:
    """Run a shell command with matplotlib hidden by benchmarks/gpu_steps.sh's hide_modules."""
    script = (f"source benchmarks/gpu_steps.sh && hide_modules {tmp_path}/hidden matplotlib && "
              f"if {sys.executable} -c 'import matplotlib' 2>/dev/null; then echo 'matplotlib not hidden'; exit 3; fi && {command}")
    return subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_fit_finishes_and_writes_its_json_without_matplotlib(tmp_path):
    out = tmp_path / "throughput.json"
    done = hidden(tmp_path, f"{sys.executable} benchmarks/train_throughput.py --device cpu --samples 64 --synth-batch 16 "
                            f"--steps 20 --batch 32 --clip-every 0 --downsample 64 --json {out}")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["fit_steps"] == 20 and result["fit_steps_per_s"] > 0
    notes = [line for line in done.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "report.html: matplotlib is not installed, so the report has no curves" in notes[0], done.stderr


def test_the_report_without_matplotlib_says_so_and_keeps_the_rest(tmp_path, monkeypatch):
    from t2f.trainer import report
    from t2f.trainer.run import Run

    run = Run(tmp_path / "run")
    run.out.mkdir()
    run.stats_path.write_text("".join(json.dumps(dict(step=s, loss=1.0 / s, w_error=0.5, w_explained=0.4, z_spread=0.3,
                                                      w_error_mean_baseline=1.0)) + "\n" for s in (1, 2)))
    assert report.can_plot()
    with_plots = report.write_report(run).read_text()
    monkeypatch.setitem(sys.modules, "matplotlib", None)        # import matplotlib now raises ImportError
    assert not report.can_plot()
    without = report.write_report(run).read_text()
    assert "data:image/png" in with_plots and "matplotlib is not installed" not in with_plots
    assert "data:image/png" not in without and "matplotlib is not installed, so the report has no curves" in without
    assert "Held-out metrics at step 2" in without
