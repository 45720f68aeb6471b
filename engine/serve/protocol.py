"""What t2f's Triton models take and give, and the limits every request is held to (numpy only).

One table for everyone who speaks the protocol: the static model repository's config.pbtxt and
model.py (repository.py, triton_model.py), the HTTP front that checks a body before it reaches
Triton (web.py, kserve.py), the page, and docs/serving.md (tests/test_protocol.py holds the
document's table to this one). numpy is the only import, so Triton's Python backend stub and the
front load it without torch.

    t2f         prompt BYTES [1], seed INT64 [1], truncation FP32 [1],
                sample INT64 [1] (optional, 0), noise_mode BYTES [1] (optional, "const")
                -> image UINT8 [H, W, 3], ws FP32 [num_ws, w_dim]
    t2f_image   image UINT8 [h, w, 3] (a face) in place of prompt; the rest as t2f

Every input has one value per row (the first axis) and a request carries 1..max batch rows. Row r
is image `sample` of `t2f-infer PROMPT --n sample+1 --seed SEED --truncation PSI` (t2f_image:
`t2f-infer --mode image --image FACE ...`) at the same --batch, bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from t2f.errors import T2FError

TEXT_MODEL = "t2f"
IMAGE_MODEL = "t2f_image"
MODELS = (TEXT_MODEL, IMAGE_MODEL)
NOISE_MODES = ("const", "random", "none")   # t2f.stylegan2.NOISE_MODES (tests/test_protocol.py holds them equal)

# ----------------------------------------------------------------------------
# Limits. A request outside them is refused before the pipeline sees it.

MAX_PROMPT_BYTES = 1024         # Longer prompts are refused before tokenizing (CLIP takes 77 tokens anyway).
MAX_NOISE_MODE_BYTES = 16
MAX_SAMPLE = 63                 # t2f-infer's --n goes up to 64.
MAX_SEED = 2**63 - 1
TRUNCATION_RANGE = (-1.0, 2.0)  # t2f-infer's --truncation range.
MAX_FACE_SIDE = 1024            # t2f_image: largest side of an input face (the largest generator's output).
MAX_IMAGE_BYTES = 16 * 1024 * 1024 * 3   # t2f_image: all faces of one request together (16 faces of 1024 x 1024).
MAX_BATCH = 256                 # The largest --max-batch.
MAX_JSON_BYTES = 4 * 1024 * 1024          # The JSON part of a KServe v2 HTTP body (faces go in its binary part).
MAX_JSON_DEPTH = 16             # Nesting of that JSON ([ and { together); a t2f request needs 5.
MAX_JSON_OUTPUT_VALUES = 2**23  # Values an answer may carry as JSON numbers (two 1024 px faces); more must ask for binary.


def max_body_bytes(max_batch: int) -> int:
    """The largest KServe v2 HTTP body a request within the limits needs (JSON part, then binary tensors)."""
    per_row = 4 + MAX_PROMPT_BYTES + 8 + 4 + 8 + 4 + MAX_NOISE_MODE_BYTES
    return MAX_JSON_BYTES + MAX_IMAGE_BYTES + max_batch * per_row


# ----------------------------------------------------------------------------
# The table.


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str                  # KServe v2 / Triton name: BYTES, INT64, FP32, UINT8
    dims: tuple                    # Without the row axis; -1 = any length (within the limits), strings name a model size.
    optional: bool = False
    meaning: str = ""

    @property
    def numpy_dtype(self):
        return DTYPES[self.datatype]


DTYPES = {"BYTES": np.object_, "INT64": np.int64, "FP32": np.float32, "UINT8": np.uint8}
ITEM_BYTES = {"INT64": 8, "FP32": 4, "UINT8": 1}       # BYTES elements carry their own length

_COMMON = (
    Tensor("seed", "INT64", (1,), meaning=f"the request's seed, 0..{MAX_SEED}"),
    Tensor("truncation", "FP32", (1,), meaning=f"truncation psi, a finite number in [{TRUNCATION_RANGE[0]:g}, {TRUNCATION_RANGE[1]:g}]"),
    Tensor("sample", "INT64", (1,), optional=True, meaning=f"which image of --n: 0..{MAX_SAMPLE} (default 0)"),
    Tensor("noise_mode", "BYTES", (1,), optional=True, meaning=f"{', '.join(NOISE_MODES)} (default const), one per request"),
)
INPUTS = {
    TEXT_MODEL: (Tensor("prompt", "BYTES", (1,), meaning=f"UTF-8 text, at most {MAX_PROMPT_BYTES} bytes and CLIP's 77 tokens"),) + _COMMON,
    IMAGE_MODEL: (Tensor("image", "UINT8", (-1, -1, 3), meaning=f"a face, sides 1..{MAX_FACE_SIDE}, all faces at most "
                         f"{MAX_IMAGE_BYTES // 2**20} MiB"),) + _COMMON,
}
OUTPUTS = (
    Tensor("image", "UINT8", ("H", "W", 3), meaning="the face (the generator's resolution)"),
    Tensor("ws", "FP32", ("num_ws", "w_dim"), meaning="its W+ latent"),
)


def markdown_table() -> str:
    """The table as docs/serving.md shows it (tests/test_protocol.py checks the document has exactly these rows)."""
    def dims(t: Tensor) -> str:
        return "[rows, " + ", ".join(str(d) for d in t.dims) + "]"

    lines = ["| model | tensor | direction | type | shape | optional | meaning |", "|---|---|---|---|---|---|---|"]
    for model in MODELS:
        for t in INPUTS[model]:
            lines.append(f"| `{model}` | `{t.name}` | in | {t.datatype} | {dims(t)} | {'yes' if t.optional else 'no'} | {t.meaning} |")
        for t in OUTPUTS:
            lines.append(f"| `{model}` | `{t.name}` | out | {t.datatype} | {dims(t)} | no | {t.meaning} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Checks on a request's declared shapes (the front, before any data is read into arrays).


class BadRequest(T2FError, ValueError):
    """A request the models refuse; its message names the problem in one line."""


def check_inputs(model: str, declared: list[tuple[str, str, list]], max_batch: int) -> dict[str, int]:
    """A request's (name, datatype, shape) list -> {name: element count}; BadRequest naming the first problem.

    Checks names, datatypes, ranks, fixed dims, the row count (1..max_batch, the same in every input)
    and the face sizes, with Python integers: no product can overflow or allocate.
    """
    if model not in INPUTS:
        raise BadRequest(f"unknown model {model!r}; t2f serves {', '.join(MODELS)}")
    table = {t.name: t for t in INPUTS[model]}
    counts: dict[str, int] = {}
    rows = None
    for name, datatype, shape in declared:
        if name not in table:
            raise BadRequest(f"model {model} has no input {name!r}; it takes {', '.join(table)}")
        if name in counts:
            raise BadRequest(f"input {name} is given twice")
        spec = table[name]
        if datatype != spec.datatype:
            raise BadRequest(f"input {name} has data-type {datatype}, model {model} expects {spec.datatype}")
        if not isinstance(shape, (list, tuple)) or not all(type(d) is int for d in shape):
            raise BadRequest(f"input {name}: shape must be a list of integers")
        if len(shape) != 1 + len(spec.dims):
            raise BadRequest(f"input {name} has shape {list(shape)}, model {model} expects [rows, {', '.join(map(str, spec.dims))}]")
        for got, want in zip(shape[1:], spec.dims):
            if (want == -1 and not 0 <= got <= 2**31) or (want != -1 and got != want):
                raise BadRequest(f"input {name} has shape {list(shape)}, model {model} expects [rows, {', '.join(map(str, spec.dims))}]")
        if rows is None:
            rows = shape[0]
            if not 1 <= rows <= max_batch:
                raise BadRequest(f"input {name} has {rows} rows; a request takes 1..{max_batch} (the max batch)")
        elif shape[0] != rows:
            raise BadRequest(f"input {name} has {shape[0]} rows, the other inputs {rows}")
        if name == "image":
            check_face_shape(shape)
        counts[name] = math.prod(shape)
    missing = [t.name for t in INPUTS[model] if not t.optional and t.name not in counts]
    if missing:
        raise BadRequest(f"input {missing[0]} is missing")
    return counts


def check_face_shape(shape) -> None:
    """t2f_image's faces [rows, h, w, 3]: sides 1..MAX_FACE_SIDE and MAX_IMAGE_BYTES in all."""
    if len(shape) != 4 or shape[-1] != 3:
        raise BadRequest(f"input image must be uint8 [rows, height, width, 3], got {list(shape)}")
    if not (1 <= min(shape[1:3]) and max(shape[1:3]) <= MAX_FACE_SIDE):
        raise BadRequest(f"image sides must be 1..{MAX_FACE_SIDE}, got {shape[1]} x {shape[2]}")
    if math.prod(shape) > MAX_IMAGE_BYTES:
        raise BadRequest(f"the faces of one request hold {math.prod(shape)} bytes, more than {MAX_IMAGE_BYTES} "
                         f"({MAX_IMAGE_BYTES // 2**20} MiB); send fewer or smaller faces")


# ----------------------------------------------------------------------------
# Requests -> rows (the models, on numpy arrays Triton has checked against config.pbtxt).


@dataclasses.dataclass
class Rows:
    """One request's rows, checked."""
    seeds: list[int]
    samples: list[int]
    truncations: list[float]
    noise_mode: str
    prompts: list[str] | None = None            # t2f
    faces: np.ndarray | None = None             # t2f_image: uint8 [rows, h, w, 3]


def _column(data: dict, name: str, dtype, rows: int, optional: bool = False):
    """Input `name` as a 1-d array of `rows` values."""
    if name not in data or data[name] is None:
        if optional:
            return None
        raise BadRequest(f"input {name} is missing")
    array = np.asarray(data[name])
    if array.dtype != dtype and not (dtype is np.object_ and array.dtype.kind in "OSU"):
        raise BadRequest(f"input {name} must be {np.dtype(dtype).name}, got {array.dtype.name}")
    if array.ndim != 2 or array.shape != (rows, 1):
        raise BadRequest(f"input {name} must have shape [{rows}, 1], got {list(array.shape)}")
    return array[:, 0]


def text(value, name: str, limit: int) -> str:
    """A BYTES element -> str; BadRequest where it is not UTF-8 or longer than `limit` bytes."""
    if isinstance(value, bytes) and len(value) > limit:
        raise BadRequest(f"{name} is too long: {len(value)} bytes, at most {limit}")
    try:
        return (value.decode("utf-8") if isinstance(value, bytes) else str(value)).strip()
    except UnicodeDecodeError:
        raise BadRequest(f"{name} is not UTF-8 text") from None


def parse_request(
    data: dict,                                         # Input name -> numpy array [rows, ...] (or None where absent).
    image_mode: bool,                                   # t2f_image (faces) rather than t2f (prompts).
    noise_modes: tuple = NOISE_MODES,                   # What the serving backend supports (exported graphs: const only).
    check_prompt: Callable[[str], None] | None = None,  # Raises BadRequest for a prompt the pipeline refuses (empty, too many tokens).
) -> Rows:
    """A request's inputs -> Rows; BadRequest naming the first problem (with its row)."""
    first = "image" if image_mode else "prompt"
    if data.get(first) is None:
        raise BadRequest(f"input {first} is missing")
    head = np.asarray(data[first])
    rows = head.shape[0] if head.ndim else 0
    if not 1 <= rows <= MAX_BATCH:
        raise BadRequest(f"a request takes 1..{MAX_BATCH} rows, got {rows}")
    seeds = _column(data, "seed", np.int64, rows)
    truncations = _column(data, "truncation", np.float32, rows)
    samples = _column(data, "sample", np.int64, rows, optional=True)
    modes = _column(data, "noise_mode", np.object_, rows, optional=True)
    for r in range(rows):
        if not 0 <= int(seeds[r]) <= MAX_SEED:
            raise BadRequest(f"seed must be in 0..{MAX_SEED}, got {int(seeds[r])} (row {r})")
        psi = float(truncations[r])
        if not math.isfinite(psi) or not TRUNCATION_RANGE[0] <= psi <= TRUNCATION_RANGE[1]:
            raise BadRequest(f"truncation must be a finite number in [{TRUNCATION_RANGE[0]:g}, {TRUNCATION_RANGE[1]:g}], got {psi} (row {r})")
        if samples is not None and not 0 <= int(samples[r]) <= MAX_SAMPLE:
            raise BadRequest(f"sample must be in 0..{MAX_SAMPLE}, got {int(samples[r])} (row {r})")
    noise = sorted({text(m, "noise_mode", MAX_NOISE_MODE_BYTES) for m in modes}) if modes is not None else ["const"]
    if len(noise) != 1 or noise[0] not in NOISE_MODES:
        raise BadRequest(f"noise_mode must be one of {', '.join(NOISE_MODES)} (one per request), got {', '.join(noise)}")
    if noise[0] not in noise_modes:
        raise BadRequest(f"noise_mode {noise[0]} needs t2f-serve --backend torch (exported graphs hold constant noise)")
    out = Rows(seeds=[int(s) for s in seeds], samples=[int(s) for s in samples] if samples is not None else [0] * rows,
               truncations=[float(t) for t in truncations], noise_mode=noise[0])
    if image_mode:
        if head.dtype != np.uint8:
            raise BadRequest(f"input image must be uint8 [rows, height, width, 3], got {head.dtype.name} {list(head.shape)}")
        check_face_shape(head.shape)
        out.faces = head
        return out
    prompts = []
    for r, value in enumerate(_column(data, "prompt", np.object_, rows)):
        try:
            prompt = text(value, "prompt", MAX_PROMPT_BYTES)
            if check_prompt is not None:
                check_prompt(prompt)
        except BadRequest as e:
            raise BadRequest(f"{e} (row {r})") from None
        prompts.append(prompt)
    out.prompts = prompts
    return out
