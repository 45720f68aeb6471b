"""t2f.files (and t2f.private): the standard-library-only file helpers the serving front, the protocol and the
repository writer share with the rest of t2f."""

import os
import subprocess
import sys
import textwrap

import pytest

from t2f.errors import T2FError
from t2f.files import (InputPathError, OutputPathError, atomic_path, json_depth_exceeds, open_regular_file, printable,
                       read_json, read_json_as, write_all)


def test_the_file_helpers_import_without_torch_numpy_or_click(tmp_path):
    """Imported with torch, numpy and click unimportable: nothing of them is loaded, and the helpers work."""
    code = textwrap.dedent(f"""\
        import sys

        class Blocked:
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in ("torch", "numpy", "click"):
                    raise ImportError(name + " is blocked here")
                return None

        sys.meta_path.insert(0, Blocked())
        import t2f.files, t2f.private
        from t2f.files import read_json, sha256_file, write_json
        from t2f.private import directory_lock
        with directory_lock({str(tmp_path)!r}, "test"):
            write_json({str(tmp_path / "a.json")!r}, {{"b": [1, 2]}})
        print(read_json({str(tmp_path / "a.json")!r}), len(sha256_file({str(tmp_path / "a.json")!r})))
        print(sorted(m for m in sys.modules if m.partition(".")[0] in ("torch", "numpy", "click")))
        print(sorted(m for m in sys.modules if m.startswith("t2f")))
        """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["{'b': [1, 2]} 64", "[]", "['t2f', 't2f.errors', 't2f.files', 't2f.private']"]


def test_path_errors_are_t2f_errors_and_still_os_errors(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OutputPathError) as out:
        with atomic_path(tmp_path / "fifo"):
            pass
    with pytest.raises(InputPathError) as into:
        open_regular_file(tmp_path / "fifo")
    for e in (out.value, into.value):
        assert isinstance(e, T2FError) and isinstance(e, OSError)        # an `except OSError` still catches them
        assert str(e) == f"{tmp_path / 'fifo'}: is a FIFO; t2f " + ("replaces" if e is out.value else "reads") + " regular files only"


def test_read_json_as_gives_each_failure_as_one_line_of_the_callers_error(tmp_path):
    """The one JSON reader of t2f.io.read_config and a training run's files: missing, malformed, unreadable."""
    class Refused(T2FError):
        pass

    (tmp_path / "bad.json").write_text("{")
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(Refused, match="^no such file here$"):
        read_json_as(tmp_path / "none.json", Refused, "no such file here")
    with pytest.raises(Refused, match="none.json: cannot read \\(No such file or directory\\)$"):
        read_json_as(tmp_path / "none.json", Refused)
    with pytest.raises(Refused, match="bad.json is not valid JSON"):
        read_json_as(tmp_path / "bad.json", Refused, "no such file here")
    with pytest.raises(Refused, match="fifo.json: cannot read \\(is a FIFO; t2f reads regular files only\\)$"):
        read_json_as(tmp_path / "fifo.json", Refused, "no such file here")
    (tmp_path / "good.json").write_text('{"a": 1}')
    assert read_json_as(tmp_path / "good.json", Refused) == {"a": 1}


def test_atomic_writes_give_an_exact_mode_or_the_umask_s(tmp_path):
    old = os.umask(0o077)
    try:
        write_all({tmp_path / "exact.txt": b"a", tmp_path / "deeper" / "exact2.txt": b"b"}, mode=0o644)
        write_all({tmp_path / "umask.txt": b"c"})
        with atomic_path(tmp_path / "private.txt", mode=0o600) as tmp:
            assert os.stat(tmp).st_mode & 0o777 == 0o600                    # never more open than asked while written
            tmp.write_bytes(b"d")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [*tmp_path.iterdir(), tmp_path / "deeper" / "exact2.txt"] if p.is_file()}
    assert modes == {"exact.txt": 0o644, "exact2.txt": 0o644, "umask.txt": 0o600, "private.txt": 0o600}
    assert (tmp_path / "deeper" / "exact2.txt").read_bytes() == b"b" and (tmp_path / "private.txt").read_bytes() == b"d"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deeper", "exact.txt", "private.txt", "umask.txt"]   # no temporary left


def test_the_json_depth_scan_skips_strings_and_counts_both_brackets(tmp_path):
    assert json_depth_exceeds(b"[" * 300_000, 16)
    assert json_depth_exceeds(b"[" * 17, 16) and not json_depth_exceeds(b"[" * 16 + b"]" * 16, 16)
    assert json_depth_exceeds('{"a": ' * 3 + "1" + "}" * 3, 2) and not json_depth_exceeds('{"a": {"b": 1}}', 2)
    assert not json_depth_exceeds(b'{"a": [[1, 2], {"b": "[[[[[[[[[[[[[[[[[[[[[["}]}', 3)   # brackets in strings do not count
    assert not json_depth_exceeds(b'{"a": "x\\"[[[[[[[[[[[[[[[[[[[[[[["}', 3)              # nor after an escaped quote
    assert json_depth_exceeds('{"a": "\\\\"' + "[" * 20, 16)                                # an escaped backslash ends the string
    assert json_depth_exceeds('["\u00e9\u2603", [[[', 3)                                   # multi-byte text before the brackets
    (tmp_path / "deep.json").write_text("[" * 33 + "]" * 33)
    (tmp_path / "ok.json").write_text("[" * 32 + "]" * 32)
    with pytest.raises(ValueError, match="nested deeper than 32 levels"):
        read_json(tmp_path / "deep.json")
    value, depth = read_json(tmp_path / "ok.json"), 0
    while value is not None:
        value, depth = (value[0] if value else None), depth + 1
    assert depth == 32


def test_printable_escapes_what_could_forge_a_log_line():
    assert printable("plain text") == "plain text"
    assert printable("a\nb\x1b[2Jc\u202e") == "a\\nb\\x1b[2Jc\\u202e"
    assert printable("x" * 20, limit=5) == "xxxxx... (15 more characters)"
