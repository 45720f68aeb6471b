"""One error type and one adapter: every error t2f raises for a user is a T2FError, and every command shows one as a
single `Error:` line (exit 1), while anything else (a plain ValueError is a bug) keeps its traceback."""

import ast
import errno

import pytest
from click.testing import CliRunner

from t2f.engine.bench import main as bench_main
from t2f.engine.cli import main as infer_main
from t2f.engine.serve import main as serve_main
from t2f.errors import T2FError, UsageError
from t2f.export.cli import main as export_main
from t2f.export.convert import main as convert_main
from t2f.files import OutputPathError
from t2f.trainer.cli import main as train_main

from helpers import TINY, assert_one_error_line
from test_structure import MODULES

# What each command's body calls first inside the adapter (looked up at call time, so a stand-in replaces it).
BODIES = [
    (infer_main, [*TINY, "a face"], "t2f.engine.config.build_pipeline"),
    (bench_main, ["--batches", "1"], "t2f.sources.load_models"),
    (export_main, [*TINY, "--out", "out", "--onnx-only"], "t2f.export.build.export_models"),
    (train_main, ["--generator", "tiny", "--clip", "tiny", "--out", "run"], "t2f.trainer.stages.train"),
    (convert_main, ["tiny", "--out", "gen"], "t2f.load_generator"),
    (serve_main, ["--mapper", "tiny", "--device", "cpu"], "t2f.sources.resolve"),
]
COMMANDS = ["t2f-infer", "t2f-bench", "t2f-export", "t2f-train", "t2f-convert", "t2f-serve"]


def _raising(error: BaseException):
    def body(*args, **kwargs):
        raise error
    return body


@pytest.mark.parametrize("command,args,body", BODIES, ids=COMMANDS)
def test_a_t2f_error_in_any_command_is_one_line_with_exit_1(command, args, body, tmp_path, monkeypatch, run_cli):
    monkeypatch.setattr(body, _raising(UsageError("the value you gave\nis refused")))
    assert_one_error_line(run_cli(command, args, tmp_path), 1, "the value you gave is refused")


@pytest.mark.parametrize("command,args,body", BODIES, ids=COMMANDS)
def test_a_plain_value_error_in_any_command_keeps_its_traceback(command, args, body, tmp_path, monkeypatch):
    """A ValueError that is not t2f's own is a bug: it reaches the caller as itself, not as a user's error line."""
    bug = ValueError("a bug, not a user's mistake")
    monkeypatch.setattr(body, _raising(bug))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(command, [str(a) for a in args])
    assert result.exception is bug and result.exit_code == 1
    assert "Error:" not in result.output and result.exc_info[2] is not None


@pytest.mark.parametrize("command,args,body,written", [
    (export_main, [*TINY, "--out", "out", "--onnx-only"], "t2f.export.build.export_models", "the output"),
    (train_main, ["--generator", "tiny", "--clip", "tiny", "--out", "run"], "t2f.trainer.stages.train", "the run directory"),
    (convert_main, ["tiny", "--out", "gen"], "t2f.weights.save_generator", "gen"),
], ids=["t2f-export", "t2f-train", "t2f-convert"])
def test_a_failed_write_names_the_file_or_what_the_command_writes(command, args, body, written, tmp_path, monkeypatch,
                                                                   run_cli):
    monkeypatch.setattr(body, _raising(OSError(errno.ENOSPC, "No space left on device", "out/graph.onnx")))
    assert_one_error_line(run_cli(command, args, tmp_path), 1, "cannot write out/graph.onnx: No space left on device")
    monkeypatch.setattr(body, _raising(OSError(errno.ENOSPC, "No space left on device")))
    assert_one_error_line(run_cli(command, args, tmp_path), 1, f"cannot write {written}: No space left on device")
    monkeypatch.setattr(body, _raising(OutputPathError("out/graph.onnx", "is a FIFO; t2f replaces regular files only")))
    assert_one_error_line(run_cli(command, args, tmp_path), 1, "cannot write out/graph.onnx: is a FIFO; t2f replaces")


# ----------------------------------------------------------------------------
# Every error class of t2f's own derives from T2FError and keeps the built-in base an `except` expects.

NOT_T2F: set[str] = set()          # every error class of t2f's is a T2FError
BUILTIN = {"Exception", "ValueError", "RuntimeError", "OSError", "TypeError", "KeyError"}


def _error_classes() -> dict[str, tuple[str, list[str]]]:
    """class name -> (module, base names) of every exception class declared in t2f's packages (read from the source)."""
    classes = {}
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases = [b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "") for b in node.bases]
                classes[node.name] = (module, bases)
    errors, grew = {}, True
    while grew:
        grew = False
        for name, (module, bases) in classes.items():
            if name not in errors and any(b in BUILTIN or b in errors for b in bases):
                errors[name], grew = (module, bases), True
    return errors


def _derives(name: str, base: str, errors: dict) -> bool:
    return name == base or any(_derives(b, base, errors) for b in errors.get(name, (None, []))[1] if b in errors or b == base)


def test_every_error_class_of_t2f_is_a_t2f_error():
    errors = _error_classes()
    assert {"RunError", "BackendUnavailable", "TritonError", "FieldError", "ImageInputError"} <= set(errors)   # the scan works
    assert sorted(n for n in errors if not _derives(n, "T2FError", errors)) == sorted(NOT_T2F)


def test_t2f_errors_keep_the_built_in_base_an_except_expects():
    from t2f.config import FieldError
    from t2f.engine.infer import ImageInputError
    from t2f.engine.serve.supervise import Stopped
    from t2f.engine.serve.triton_files import TritonError
    from t2f.hub import HubIdError

    for cls, builtin in ((UsageError, ValueError), (FieldError, ValueError), (HubIdError, ValueError),
                         (ImageInputError, ValueError), (TritonError, RuntimeError), (Stopped, RuntimeError)):
        assert issubclass(cls, T2FError) and issubclass(cls, builtin), cls


def test_a_library_call_with_a_bad_argument_raises_a_usage_error():
    """What a caller got wrong is a UsageError (still a ValueError); an internal inconsistency stays a plain ValueError."""
    from t2f.devices import resolve_device
    from t2f.precision import Precision

    for call in (lambda: resolve_device("tpu"), lambda: Precision.parse("fp8"), lambda: Precision.FP16.check_device("cpu")):
        with pytest.raises(UsageError):
            call()


def test_first_line_is_one_stripped_line_typed_on_request():
    from t2f.errors import first_line

    error = RuntimeError("\n  the first line  \nthe second\n")
    assert first_line(error) == "the first line" and first_line(error, typed=True) == "RuntimeError: the first line"
    assert first_line(error, limit=3) == "the" and first_line(ValueError("")) == first_line(ValueError(" \n"), typed=True) == "ValueError"


def test_first_line_skips_a_library_preamble_and_openvino_errors_give_their_reason():
    """OpenVINO's messages start with its source locations; the line t2f reports is the reason after them."""
    import re

    from t2f.errors import first_line

    assert first_line(RuntimeError("at x:1:\n\nthe reason\n"), skip=re.compile(r"at \S+:\d+:$")) == "the reason"
    assert first_line(RuntimeError("at x:1:"), typed=True, skip=re.compile(r"at \S+:\d+:$")) == "RuntimeError"
    import numpy as np

    ov = pytest.importorskip("openvino", reason="openvino is not installed")
    from openvino import opset13 as ops

    from t2f.engine.backends.openvino_runtime import OPENVINO_LOCATION

    parameter = ops.parameter([1, 3], np.float32)
    with pytest.raises(RuntimeError) as caught:
        ov.Core().compile_model(ov.Model([ops.relu(parameter)], [parameter]), "CPU", {"INFERENCE_PRECISION_HINT": "bogus"})
    assert str(caught.value).startswith("Exception from")                      # what first_line alone would report
    assert first_line(caught.value, skip=OPENVINO_LOCATION).startswith("Wrong value bogus for property key INFERENCE_PRECISION_HINT")
