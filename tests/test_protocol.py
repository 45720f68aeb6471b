"""engine/serve/protocol.py and the front's body checks (engine/serve/kserve.py), without a server: the table, the limits, crafted bodies."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import re
import struct
import zlib

import numpy as np
import pytest

from t2f.engine.serve import protocol
from t2f.engine.serve.protocol import MAX_FACE_SIDE, MAX_IMAGE_BYTES, BadRequest, check_inputs, parse_request

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "serving.md")


def test_the_documented_table_is_the_protocol_modules():
    with open(DOCS, encoding="utf-8") as f:
        text = f.read()
    rows = [line for line in text.splitlines() if re.match(r"^\| `t2f", line)]
    expected = [line for line in protocol.markdown_table().splitlines() if line.startswith("| `")]
    assert rows == expected


def test_the_protocols_noise_modes_are_the_generators():
    from t2f.stylegan2 import NOISE_MODES

    assert protocol.NOISE_MODES == NOISE_MODES


def test_the_protocol_module_imports_numpy_only():
    import subprocess
    import sys

    # Loaded as a file of its own: what it imports itself (t2f.engine's __init__ loads the pipeline anyway).
    out = subprocess.run([sys.executable, "-c", "import importlib.util, sys; spec = importlib.util.spec_from_file_location('p', "
                          f"{os.path.join(os.path.dirname(protocol.__file__), 'protocol.py')!r}); m = importlib.util.module_from_spec(spec); sys.modules['p'] = m; "
                          "spec.loader.exec_module(m); print(sorted(k for k in ('torch', 'starlette', 'tritonclient', 'click') if k in sys.modules))"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", (out.stdout, out.stderr)


TEXT = [("prompt", "BYTES", [2, 1]), ("seed", "INT64", [2, 1]), ("truncation", "FP32", [2, 1])]


@pytest.mark.parametrize("change, message", [
    (("seed", "INT64", [2**40, 1]), "rows"),                  # crafted case 1: Triton's HTTP front end died on these
    (("seed", "INT64", [2**62, 1]), "rows"),
    (("seed", "INT64", [1, 2**62]), "expects \\[rows, 1\\]"),
    (("seed", "INT64", [-1, 1]), "rows"),
    (("seed", "FP32", [2, 1]), "seed has data-type FP32"),
    (("seed", "INT64", [2, 1, 1]), "expects \\[rows, 1\\]"),
    (("seed", "INT64", [2.5, 1]), "list of integers"),
    (("seed", "INT64", "[2, 1]"), "list of integers"),
    (("colour", "INT64", [2, 1]), "no input 'colour'"),
    (("seed", "INT64", [3, 1]), "3 rows, the other inputs 2"),
])
def test_declared_shapes_are_checked_with_python_integers(change, message):
    declared = [change if name == change[0] else (name, dtype, shape) for name, dtype, shape in TEXT]
    if change[0] not in dict((n, 0) for n, _, _ in TEXT):
        declared = TEXT + [change]
    with pytest.raises(BadRequest, match=message):
        check_inputs("t2f", declared, max_batch=16)
    assert check_inputs("t2f", TEXT, max_batch=16) == dict(prompt=2, seed=2, truncation=2)


@pytest.mark.parametrize("shape, message", [
    ([1, 0, 0, 3], "image sides must be 1..1024, got 0 x 0"),           # crafted case 9: a zero-size face
    ([1, MAX_FACE_SIDE + 1, 8, 3], "image sides"),
    ([8, 4096, 4096, 3], "image sides"),                               # crafted case 5: 384 MiB of faces
    ([17, 1024, 1024, 3], f"more than {MAX_IMAGE_BYTES}"),
    ([1, 8, 8, 4], "expects \\[rows, -1, -1, 3\\]"),
])
def test_face_shapes_are_bounded(shape, message):
    rows = shape[0]
    declared = [("image", "UINT8", shape), ("seed", "INT64", [rows, 1]), ("truncation", "FP32", [rows, 1])]
    with pytest.raises(BadRequest, match=message):
        check_inputs("t2f_image", declared, max_batch=32)


def test_parse_request_refuses_by_name_and_row():
    rows = dict(prompt=np.array([[b"a"], [b"\xff"]], dtype=object), seed=np.array([[0], [1]], np.int64),
                truncation=np.array([[0.7], [0.7]], np.float32))
    with pytest.raises(BadRequest, match=r"^prompt is not UTF-8 text \(row 1\)$"):
        parse_request(rows, image_mode=False)
    rows["prompt"] = np.array([[b"a"], [b"b"]], dtype=object)
    parsed = parse_request(rows, image_mode=False)
    assert parsed.prompts == ["a", "b"] and parsed.samples == [0, 0] and parsed.noise_mode == "const"
    with pytest.raises(BadRequest, match="noise_mode random needs t2f-serve --backend torch"):
        parse_request({**rows, "noise_mode": np.array([[b"random"], [b"random"]], dtype=object)}, image_mode=False, noise_modes=("const",))
    face = dict(image=np.zeros([1, 0, 0, 3], np.uint8), seed=np.array([[0]], np.int64), truncation=np.array([[0.7]], np.float32))
    with pytest.raises(BadRequest, match="image sides must be"):
        parse_request(face, image_mode=True)


# ----------------------------------------------------------------------------
# The front's body parser.


def body(inputs, binary=b"", **extra):
    header = json.dumps(dict(inputs=inputs, **extra)).encode()
    return header + binary, len(header)


GOOD = [dict(name="prompt", datatype="BYTES", shape=[1, 1], data=["a face"]), dict(name="seed", datatype="INT64", shape=[1, 1], data=[[3]]),
        dict(name="truncation", datatype="FP32", shape=[1, 1], data=[0.5])]


def test_a_json_body_becomes_raw_tensors():
    from t2f.engine.serve.web import parse_infer_body

    parsed = parse_infer_body(*body(GOOD, parameters=dict(binary_data_output=True)), "t2f", 16)
    raw = {t.name: t.raw for t in parsed.inputs}
    assert raw == dict(prompt=struct.pack("<I", 6) + b"a face", seed=struct.pack("<q", 3), truncation=struct.pack("<f", 0.5))
    assert parsed.binary_default and parsed.outputs == []


@pytest.mark.parametrize("inputs, binary, message", [
    ([{**GOOD[0], "data": ["x" * 2000]}] + GOOD[1:], b"", "prompt is too long: 2000 bytes"),
    ([GOOD[0], {**GOOD[1], "data": [1, 2]}, GOOD[2]], b"", "seed has 2 values, its shape holds 1"),
    ([GOOD[0], {**GOOD[1], "data": [1.5]}, GOOD[2]], b"", "INT64 data must be integers"),
    ([GOOD[0], {**GOOD[1], "data": [2**70]}, GOOD[2]], b"", "outside INT64's range"),
    ([GOOD[0], {**GOOD[1], "data": None, "parameters": dict(binary_data_size=16)}, GOOD[2]], b"\0" * 16, "16 bytes of data"),
    ([GOOD[0], {**GOOD[1], "parameters": dict(binary_data_size=10**12)}, GOOD[2]], b"", "more than the body holds"),
    (GOOD, b"extra", "bytes after the last binary tensor"),
    ([{**GOOD[0], "data": None, "parameters": dict(binary_data_size=8)}] + GOOD[1:], struct.pack("<I", 2**31) + b"abcd", "prompt is too long"),
])
def test_crafted_bodies_are_refused_in_one_line(inputs, binary, message):
    from t2f.engine.serve.web import parse_infer_body

    inputs = [{k: v for k, v in t.items() if v is not None} for t in inputs]
    with pytest.raises(BadRequest, match=message) as info:
        parse_infer_body(*body(inputs, binary), "t2f", 16)
    assert "\n" not in str(info.value)


def test_nested_and_broken_json_are_refused():
    from t2f.engine.serve.web import parse_infer_body

    with pytest.raises(BadRequest, match="nests deeper than 16"):
        parse_infer_body(b"[" * 300_000, None, "t2f", 16)
    with pytest.raises(BadRequest, match="not JSON"):
        parse_infer_body(b'{"inputs": [', None, "t2f", 16)
    with pytest.raises(BadRequest, match="Inference-Header-Content-Length 99"):
        parse_infer_body(b"{}", 99, "t2f", 16)


def _read(data: bytes, headers: dict, limit: int, chunk: int = 65536):
    from t2f.engine.serve.web import read_body

    async def stream():
        for k in range(0, len(data), chunk):
            yield data[k:k + chunk]
    return asyncio.run(read_body(stream(), headers, limit))


def test_bodies_are_bounded_before_and_after_decompression():
    from t2f.engine.serve.web import Refused

    bomb = gzip.compress(b"\0" * (64 * 2**20))                                       # crafted case 4 (64 MiB here, 1 GiB in test_serve.py)
    with pytest.raises(Refused, match="expands past") as info:
        _read(bomb, {"content-encoding": "gzip"}, limit=2**20)
    assert info.value.status == 413
    with pytest.raises(Refused, match="more than") as info:
        _read(b"", {"content-length": str(200 * 2**20)}, limit=2**20)                  # refused before a byte is read
    assert info.value.status == 413
    with pytest.raises(Refused, match="more than"):
        _read(b"x" * (2**20 + 1), {}, limit=2**20)                                     # chunked, no length
    with pytest.raises(Refused, match="br is not supported") as info:
        _read(b"x", {"content-encoding": "br"}, limit=2**20)
    assert info.value.status == 415
    assert _read(gzip.compress(b"hello"), {"content-encoding": "gzip"}, limit=100) == b"hello"
    assert _read(zlib.compress(b"hello"), {"content-encoding": "deflate"}, limit=100) == b"hello"
    with pytest.raises(Refused, match="truncated or corrupt"):
        _read(gzip.compress(b"hello")[:-6], {"content-encoding": "gzip"}, limit=100)


def _answer(rows: int, side: int):
    """A stand-in for Triton's ModelInferResponse: `rows` faces of side x side and their ws."""
    from types import SimpleNamespace

    image = SimpleNamespace(name="image", datatype="UINT8", shape=[rows, side, side, 3])
    ws = SimpleNamespace(name="ws", datatype="FP32", shape=[rows, 2, 4])
    return SimpleNamespace(model_name="t2f", model_version="1", outputs=[ws, image],
                           raw_output_contents=[bytes(4 * rows * 8), bytes(rows * side * side * 3)])


def test_answers_as_json_numbers_are_bounded_and_binary_ones_are_not():
    from t2f.engine.serve.kserve import InferBody, response_body
    from t2f.engine.serve.web import Refused

    text, headers = response_body(_answer(2, 8), InferBody("", [], [], False))                 # small: JSON numbers
    assert headers["content-type"] == "application/json" and json.loads(text)["outputs"][1]["data"] == [0] * (2 * 8 * 8 * 3)
    big = _answer(3, MAX_FACE_SIDE)                                                           # 3 x 1024 px: 9.4 M values
    with pytest.raises(Refused, match="hold 9437208 values, more than 8388608: ask for them as binary data") as info:
        response_body(big, InferBody("", [], [], False))
    assert info.value.status == 400 and "\n" not in str(info.value)
    with pytest.raises(Refused, match=r"\(image\)"):                                           # ws alone would fit
        response_body(big, InferBody("", [], [("image", False), ("ws", True)], False))
    text, headers = response_body(big, InferBody("", [], [("image", True), ("ws", False)], False))
    length = int(headers["inference-header-content-length"])
    assert len(text) - length == 3 * MAX_FACE_SIDE**2 * 3 and json.loads(text[:length])["outputs"][1]["parameters"]
    text, _ = response_body(big, InferBody("", [], [], True))                                  # binary_data_output
    assert len(text) > 3 * MAX_FACE_SIDE**2 * 3
