"""t2f's static Triton model repository: config.pbtxt and model.py for t2f and t2f_image, in a private directory.

    REPOSITORY/
      t2f/config.pbtxt          backend "python", max batch, dynamic batching, instance groups, parameter t2f (JSON)
      t2f/1/model.py            triton_model.py, unchanged
      t2f_image/...             the same for the image model

`t2f-serve` writes one into its workspace and runs tritonserver on it with `--model-control-mode
none`; `t2f-serve --write-repository DIR` writes the same for NVIDIA's Triton container
(docs/serving.md). Files are written atomically and the directories are created 0700; a DIR (or
a folder in it, or a directory above it) that another user owns or can write is refused, since
Triton runs the model.py it finds there.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os

from t2f.files import write_all

from .protocol import IMAGE_MODEL, INPUTS, MODELS, OUTPUTS


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """What each model instance loads: t2f.engine.load_pipeline's arguments, less the device (the instance group's)."""
    generator: str | None               # None = the one the mapper was trained for
    clip: str | None                    # None = the one the mapper was trained for
    mapper: str | None
    backend: str = "torch"
    artifacts: str | None = None
    precision: str = "fp32"
    batch_size: int | None = None       # None = 1 on the CPU, 8 on a GPU
    cache: str | None = None            # None = $T2F_CACHE or ~/.cache/t2f of the server
    threads: int = 0                    # torch CPU threads per instance; 0 = torch's default


def instance_groups(devices: list[str]) -> list[tuple[str, int, int | None]]:
    """Devices ("cpu", "cuda:N", one per instance) -> (kind, count, gpu) groups for config.pbtxt, in order."""
    groups: list[list] = []
    for device in devices:
        kind, gpu = ("KIND_CPU", None) if device == "cpu" else ("KIND_GPU", int(device.partition(":")[2] or 0))
        if groups and groups[-1][0] == kind and groups[-1][2] == gpu:
            groups[-1][1] += 1
        else:
            groups.append([kind, 1, gpu])
    return [tuple(g) for g in groups]


def _dims(dims) -> str:
    return ", ".join(str(d if isinstance(d, int) else -1) for d in dims)


def config_pbtxt(model: str, options: ModelOptions, devices: list[str], max_batch: int, queue_delay_us: int) -> str:
    """config.pbtxt of `model` (Triton's text protobuf)."""
    def tensor(t, is_input: bool) -> str:
        optional = " optional: true" if is_input and t.optional else ""
        return f'  {{ name: "{t.name}" data_type: TYPE_{"STRING" if t.datatype == "BYTES" else t.datatype} dims: [ {_dims(t.dims)} ]{optional} }}'

    groups = []
    for kind, count, gpu in instance_groups(devices):
        groups.append(f"  {{ kind: {kind} count: {count}" + (f" gpus: [ {gpu} ]" if gpu is not None else "") + " }")
    parameters = json.dumps({k: v for k, v in dataclasses.asdict(options).items() if v is not None}, sort_keys=True)
    return "\n".join([
        f'name: "{model}"',
        'backend: "python"',
        f"max_batch_size: {max_batch}",
        "input [", ",\n".join(tensor(t, True) for t in INPUTS[model]), "]",
        "output [", ",\n".join(tensor(t, False) for t in OUTPUTS), "]",
        f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}",
        "instance_group [", ",\n".join(groups), "]",
        f"parameters {{ key: \"t2f\" value: {{ string_value: {json.dumps(parameters)} }} }}",
        "",
    ])


def model_py() -> bytes:
    return importlib.resources.files(__package__).joinpath("triton_model.py").read_bytes()


def write_repository(directory: str, options: ModelOptions, devices: list[str], max_batch: int = 32, queue_delay_us: int = 0,
                     file_mode: int = 0o600) -> list[str]:
    """Write the repository into `directory` (created 0700 where missing), each file `file_mode`; the paths written.

    An existing directory may hold other models; t2f's own files are all written before any replaces its old copy
    (t2f.files.write_all). UnsafePathError
    (one line) where another user owns or can write `directory`, a model's folder in it, or can rename one
    of the directories above it (t2f.private.private_dir).
    """
    from t2f.private import private_dir

    files = {}
    for model in MODELS:
        private_dir(directory, model, "1", fix="choose a directory of your own")
        files[os.path.join(directory, model, "config.pbtxt")] = config_pbtxt(model, options, devices, max_batch, queue_delay_us).encode()
        files[os.path.join(directory, model, "1", "model.py")] = model_py()
    write_all(files, mode=file_mode)
    return list(files)


__all__ = ["IMAGE_MODEL", "ModelOptions", "config_pbtxt", "instance_groups", "write_repository"]
