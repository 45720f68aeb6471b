"""Which backends there are, and choosing one: `register`, `choose` (with `auto`) and `make_backend`.

A backend class registers itself with `@register` in its own file; the package imports t2f's own backend modules
(`t2f.engine.backends.BUILTIN`), then loads the entry points of group `t2f.backends` once (`load_entry_points`), so
another package adds a runtime with one file and one entry point:

    [project.entry-points."t2f.backends"]
    my-runtime = "my_package.my_backend"        # a module whose class is decorated with @register (or the class)

`auto` is the first (backend, precision) of the device's preference list that passes `check_available`. The list
(`preference`) is made from what each registered class declares (`Backend.auto_rank`), ordered by rank; t2f's own
ranks follow measured end-to-end speed (benchmarks/RESULTS.md: on the 2-core AMD EPYC development CPU, OpenVINO bf16
ran text -> uint8 image fastest; on an H200, one fp16 CUDA graph ran fastest of what we could run there) and rank only
accurate paths: every graph within its precision's parity bounds (`t2f.export.onnx_export`: fp32 1e-4 relative, fp16
2e-2, bf16 per graph, a failing bf16 graph runs fp32). torch-compile has no rank: its first call compiles for 10 s
to minutes, more than it saves in a run of a few images. Given the models, `auto` skips the backends that cannot run
their CLIP's text tower (every one but `torch` runs t2f's exportable rewrite of it): such a CLIP runs on `torch`.
"""

from __future__ import annotations

import inspect
import warnings

import torch

from t2f.errors import first_line
from t2f.precision import Precision

from .base import Backend
from .types import BackendUnavailable, Models

ENTRY_POINTS = "t2f.backends"
BACKEND_CLASSES: dict[str, type[Backend]] = {}      # name -> class, in registration order (t2f's own first)


def register(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make `cls` a backend that `--backend` and `auto` know by its `name`. TypeError where it is not
    a complete Backend (an abstract method left), its name is taken, or it ranks a precision it does not run there."""
    if not (isinstance(cls, type) and issubclass(cls, Backend)) or inspect.isabstract(cls):
        raise TypeError(f"{cls!r} is not a Backend subclass with encode, map and synthesize")
    if not cls.name or cls.name == "auto" or cls.name in BACKEND_CLASSES and BACKEND_CLASSES[cls.name] is not cls:
        raise TypeError(f"backend name {cls.name!r} is {'taken' if cls.name in BACKEND_CLASSES else 'not a name'}")
    for device, ranks in cls.auto_rank.items():
        odd = [p for p in ranks if device not in cls.devices or p not in cls.precisions or p.device_type not in (None, device)]
        if odd:
            raise TypeError(f"{cls.name} ranks {device} {', '.join(map(str, odd))}, which it does not run")
    BACKEND_CLASSES[cls.name] = cls
    return cls


def backend_names() -> tuple[str, ...]:
    return tuple(BACKEND_CLASSES)


def builtin_classes() -> dict[str, type[Backend]]:
    """t2f's own backends (those of t2f.engine.backends), as the docs' tables show them."""
    return {name: cls for name, cls in BACKEND_CLASSES.items() if cls.__module__.startswith(__package__ + ".")}


def load_entry_points(entry_points=None) -> list[str]:
    """Load the backends other packages declare in the entry-point group `t2f.backends` (each a module that registers
    its class, or the class itself); one that fails to load is left out with a warning. The names that failed."""
    import importlib.metadata

    failed = []
    for entry in importlib.metadata.entry_points(group=ENTRY_POINTS) if entry_points is None else entry_points:
        try:
            loaded = entry.load()
            if isinstance(loaded, type):
                register(loaded)
        except Exception as e:              # a broken plugin never stops t2f's own backends
            failed.append(entry.name)
            warnings.warn(f"backend entry point {entry.name} ({entry.value}) does not load: "
                          f"{first_line(e)}", RuntimeWarning, stacklevel=2)
    return failed


def preference(device_type: str, classes: dict[str, type[Backend]] | None = None) -> list[tuple[str, Precision]]:
    """`auto`'s (backend, precision) list on a device type, best first: every registered class's `auto_rank` entries
    there, by rank (equal ranks in registration order)."""
    classes = BACKEND_CLASSES if classes is None else classes
    ranked = [(rank, i, name, precision) for i, (name, cls) in enumerate(classes.items())
              for precision, rank in cls.auto_rank.get(device_type, {}).items()]
    return [(name, precision) for _, _, name, precision in sorted(ranked, key=lambda r: r[:2])]


def choose(device: torch.device, backend: str = "auto", precision: Precision | None = None, artifacts=None,
           noise_mode: str = "const", memory_format: str = "nchw", models: Models | None = None) -> tuple[type[Backend], Precision]:
    """(backend class, precision) for a request; `backend` "auto" and `precision` None (auto) are resolved from the
    device's preference list: its first entry that matches what was fixed and passes `check_available` (given
    `models`, one that can run their text tower: `torch` for a tower the exportable rewrite cannot express).

    BackendUnavailable with one line where none passes.
    """
    if backend != "auto" and backend not in BACKEND_CLASSES:
        raise BackendUnavailable(f"unknown backend {backend!r}; one of auto, {', '.join(BACKEND_CLASSES)}")
    fp32 = Precision.FP32
    candidates = [(name, p) for name, p in preference(device.type) if backend in ("auto", name) and precision in (None, p)]
    if noise_mode != "const":       # only eager PyTorch draws noise: the list's torch entries, else torch as asked
        candidates = [c for c in candidates if noise_mode in BACKEND_CLASSES[c[0]].noise_modes] or \
                     [("torch", precision or (fp32 if device.type == "cpu" else Precision.FP16))]
    if memory_format != "nchw":     # auto picks among the backends that run this layout
        candidates = [c for c in candidates if memory_format in BACKEND_CLASSES[c[0]].memory_formats]
    if backend != "auto":           # a named backend: its preferred precisions on this device, then any it has
        cls = BACKEND_CLASSES[backend]
        candidates += [(backend, p) for p in cls.precisions if (backend, p) not in candidates and precision in (None, p)]
        if not candidates:
            raise BackendUnavailable(f"{backend} runs in {' or '.join(map(str, cls.precisions))}, not {precision}")
    elif not candidates:
        layout = "" if memory_format == "nchw" else f" with {memory_format}"
        raise BackendUnavailable(f"no backend runs in {precision or 'any precision'}{layout} on {device.type}")
    errors = []
    for name, p in candidates:
        try:
            BACKEND_CLASSES[name].check_available(device, p, artifacts, noise_mode, memory_format, models)
            return BACKEND_CLASSES[name], p
        except BackendUnavailable as e:
            errors.append(e)
    # auto: why its first choice cannot run; a named backend: why its plainest precision cannot (a missing package, say)
    raise errors[0] if backend == "auto" else errors[-1]


def make_backend(name: str, models: Models, device: torch.device, precision: Precision | None = None,
                 artifacts: str | None = None, noise_mode: str = "const", memory_format: str = "nchw") -> Backend:
    """A backend by name ("auto": see `choose`), in `precision` (None: the backend's best here) and `memory_format`
    (MEMORY_FORMATS); BackendUnavailable, before any export, where it cannot run here."""
    from t2f.graphs import ExportError

    cls, precision = choose(device, name, precision, artifacts, noise_mode, memory_format, models)
    try:
        return cls(models, device, precision, artifacts, memory_format)
    except ExportError as e:                     # artifacts that cannot be used here: this backend cannot run
        raise BackendUnavailable(str(e)) from None
