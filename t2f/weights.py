"""Safe import of StyleGAN2 weights: NVIDIA pickles, rosinality checkpoints, converted directories.

NVIDIA's pickles (stylegan2-ada-pytorch, stylegan3-release) embed Python source that
`torch_utils.persistence` executes on load. We never execute anything from a weights file:
`SafeUnpickler` rebuilds tensors, plain containers and numeric scalars, turns each persistent
object into a `PersistentRecord` (class name + state, the source is ignored), and refuses any
other global by name.

Conversion is an explicit name table per source format; every tensor of our generator must be
matched with the right shape and every source tensor used (or checked, for fixed filters), or
the import fails naming what did not match.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from .io import WeightsError, build_checked, load_model_dir, save_model_dir
from .stylegan2 import Generator, GeneratorConfig, fir_filter

GENERATOR_KIND = "stylegan2-generator"


# ----------------------------------------------------------------------------
# Restricted unpickler.
#
# What it guarantees for any byte sequence: no code from the file runs (only the globals
# below resolve, each a checked stand-in), and the work and memory are bounded by the
# file's size: every opcode costs bounded time and at most MAX_PICKLE_OPS run; no read
# allocates more than the file holds; tensors may not materialize more bytes than the file
# holds (a stride-0 view over a small storage is refused); dict keys and set members must
# be flat scalars (hashing a shared tuple tree is exponential); and the loaded object graph
# is walked once per object, refusing cycles, nesting deeper than MAX_PICKLE_DEPTH and a
# graph whose unfolded size (counting shared parts once per path) exceeds the budget.
# Anything else malformed is one WeightsError.

MAX_PICKLE_OPS = 1 << 22          # Opcodes per file; NVIDIA's FFHQ pickle needs about 10^5.
MAX_PICKLE_DEPTH = 64             # Nesting of the loaded objects; a generator record needs about 10.
MAX_TENSOR_DIMS = 16


@dataclasses.dataclass
class PersistentRecord:
    """What a `torch_utils.persistence` object becomes: its class name and state, never its code."""
    class_name: str
    state: dict


class _PlainDict(dict):
    """Stand-in for dnnlib.util.EasyDict."""


class _PlainNamespace:
    """Stand-in for argparse.Namespace (rosinality training checkpoints keep their arguments in one)."""


class _StorageType:
    """Stand-in for torch.FloatStorage and its kin in a checkpoint's persistent ids: just the dtype."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


_STORAGE_TYPES = {name: _StorageType(dtype) for name, dtype in (
    ("FloatStorage", torch.float32), ("HalfStorage", torch.float16), ("BFloat16Storage", torch.bfloat16),
    ("DoubleStorage", torch.float64), ("LongStorage", torch.int64), ("IntStorage", torch.int32),
    ("ShortStorage", torch.int16), ("CharStorage", torch.int8), ("ByteStorage", torch.uint8), ("BoolStorage", torch.bool))}

_SCALARS = (str, bytes, int, float, complex, bool, type(None))


def _check_keys(keys) -> None:
    """Dict keys and set members must hash in time linear in their size: scalars, or flat tuples of scalars."""
    for key in keys:
        if not (isinstance(key, _SCALARS) or (type(key) is tuple and all(isinstance(k, _SCALARS) for k in key))):
            raise pickle.UnpicklingError(f"refusing a {type(key).__name__} as a dict key or set member")


def _reconstruct_persistent(meta):
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict) \
            or not isinstance(meta.get("class_name"), str):
        raise pickle.UnpicklingError("malformed torch_utils.persistence record")
    return PersistentRecord(class_name=meta["class_name"], state=dict(meta["state"]))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("parameter without a tensor")
    return data


_NUMERIC_DTYPE = re.compile(r"[<>|=]?[biufc?][1-9][0-9]?|[<>|=]?\?")


def _numpy_dtype(spec, align=False, copy=False):
    """Only plain numeric dtypes, by their type string; always numpy's shared instance."""
    if not isinstance(spec, str) or len(spec) > 8 or not _NUMERIC_DTYPE.fullmatch(spec):
        shown = repr(spec) if isinstance(spec, str) and len(spec) <= 8 else f"a {type(spec).__name__}"
        raise pickle.UnpicklingError(f"only plain numeric numpy dtypes are allowed, not {shown}")
    return np.dtype(spec)


def _numpy_scalar(dtype, data=None):
    """A numeric numpy scalar, returned as a Python number."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or dtype.fields is not None or dtype.subdtype is not None:
        raise pickle.UnpicklingError("only numeric numpy scalars are allowed")
    if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError("malformed numpy scalar")
    return np.frombuffer(data, dtype=dtype, count=1)[0].item()


def _latin1_bytes(text, encoding="latin1"):
    """Protocol-2 pickles spell bytes as _codecs.encode(text, 'latin1')."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("only latin1 byte strings are allowed")
    return text.encode("latin1")


def _ordered_dict(items=()):
    items = list(items)
    if not all(type(item) in (tuple, list) and len(item) == 2 for item in items):
        raise pickle.UnpicklingError("malformed OrderedDict")
    _check_keys(k for k, _ in items)
    return collections.OrderedDict(items)


def _checked_set(kind):
    def build(items=()):
        items = list(items)
        _check_keys(items)
        return kind(items)
    return build


_SAFE_GLOBALS = {
    ("_codecs", "encode"): _latin1_bytes,
    ("collections", "OrderedDict"): _ordered_dict,
    ("builtins", "set"): _checked_set(set),
    ("builtins", "frozenset"): _checked_set(frozenset),
    ("__builtin__", "set"): _checked_set(set),
    ("__builtin__", "frozenset"): _checked_set(frozenset),
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent,
    ("dnnlib.util", "EasyDict"): _PlainDict,
    ("argparse", "Namespace"): _PlainNamespace,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    **{("torch", name): storage_type for name, storage_type in _STORAGE_TYPES.items()},
}
# Globals that need the unpickler's budget: resolved to its methods of these names.
_BUDGETED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): "rebuild_tensor",
    ("torch.storage", "_load_from_bytes"): "storage_from_bytes",
}


class _Budget:
    """What one file may still cost: opcodes run and tensor bytes materialized."""

    def __init__(self, file_size: int):
        self.ops = MAX_PICKLE_OPS
        self.tensor_bytes = 2 * file_size + (1 << 20)   # views of shared storages may repeat a little


def _counted(op):
    def run(self):
        self.budget.ops -= 1
        if self.budget.ops < 0:
            raise pickle.UnpicklingError(f"refusing a pickle of more than {MAX_PICKLE_OPS} operations")
        op(self)
    return run


def _storage(data, dtype: torch.dtype) -> torch.TypedStorage:
    """A CPU storage of `dtype` holding a copy of `data` (whose length must be a whole number of elements)."""
    size = torch.empty([], dtype=dtype).element_size()
    if len(data) % size:
        raise pickle.UnpicklingError("tensor storage bytes are not a whole number of elements")
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty([0], dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # TypedStorage deprecation notices
        return torch.TypedStorage(wrap_storage=flat.untyped_storage(), dtype=dtype, _internal=True)


class SafeUnpickler(pickle._Unpickler):
    """Unpickler that resolves only the globals in `_SAFE_GLOBALS`, restricts BUILD and bounds its work.

    Built on the pure-Python unpickler so each opcode can be checked: BUILD may only restate
    a numpy dtype's own state, give a Namespace stand-in plain attributes, or set nothing;
    dict keys and set members must be flat scalars; every opcode counts against the budget.
    `storages` (a checkpoint's data/ entries by key) enables the persistent ids of torch's
    zip format; without it any persistent id is refused.
    """

    dispatch = {code: _counted(op) for code, op in pickle._Unpickler.dispatch.items()}

    def __init__(self, file, budget: _Budget, storages=None):
        super().__init__(file)
        self.budget, self.storages, self.loaded_storages = budget, storages, {}

    def find_class(self, module: str, name: str):
        if (module, name) in _BUDGETED_GLOBALS:
            return getattr(self, _BUDGETED_GLOBALS[(module, name)])
        try:
            return _SAFE_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise pickle.UnpicklingError(f"refusing to load global '{module}.{name}': weights files may not run code") from None

    def persistent_load(self, pid):
        if self.storages is None:
            raise pickle.UnpicklingError("refusing persistent id in a plain pickle")
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise pickle.UnpicklingError("malformed storage reference")
        key, dtype = pid[2], pid[1].dtype
        if key not in self.loaded_storages:
            self.loaded_storages[key] = _storage(self.storages(key), dtype)
        storage = self.loaded_storages[key]
        if storage.dtype != dtype:
            raise pickle.UnpicklingError(f"storage {key} is used with two dtypes")
        return storage

    # Tensors.

    def rebuild_tensor(self, storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
        """A tensor view of a storage, if it stays inside the storage, holds no more elements than the storage
        (no stride-0 expansion) and fits the file's budget; hooks and metadata are dropped."""
        if not isinstance(storage, torch.TypedStorage):
            raise pickle.UnpicklingError("tensor without a storage")
        if type(size) not in (tuple, list) or type(stride) not in (tuple, list) or len(size) != len(stride) \
                or len(size) > MAX_TENSOR_DIMS:
            raise pickle.UnpicklingError("malformed tensor shape")
        if not all(type(v) is int and v >= 0 for v in (storage_offset, *size, *stride)):
            raise pickle.UnpicklingError("malformed tensor shape")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # TypedStorage deprecation notices
            length, element_size = storage.size(), storage.element_size()
        numel = math.prod(size)
        if numel and storage_offset + sum((n - 1) * st for n, st in zip(size, stride)) >= length:
            raise pickle.UnpicklingError("refusing a tensor that reaches outside its storage")
        if numel > length - storage_offset:
            raise pickle.UnpicklingError(f"refusing a tensor view of {numel} elements over a storage of {length}")
        self.budget.tensor_bytes -= numel * element_size
        if self.budget.tensor_bytes < 0:
            raise pickle.UnpicklingError("refusing tensors larger in all than the file that holds them")
        return torch._utils._rebuild_tensor(storage, storage_offset, tuple(size), tuple(stride))

    def storage_from_bytes(self, data):
        """A storage pickled by NVIDIA's code: torch's legacy format in a bytes object, read here, not by torch.load."""
        if not isinstance(data, (bytes, bytearray)):
            raise pickle.UnpicklingError("tensor storage is not bytes")
        return _legacy_storage(io.BytesIO(data), self.budget)

    # Opcodes that hash keys or set state.

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, np.dtype) and type(state) is tuple and state == inst.__reduce__()[2]:
            return
        if isinstance(inst, _PlainNamespace) and type(state) is dict and all(type(k) is str for k in state):
            inst.__dict__.update(state)
            return
        if state is None or (isinstance(state, dict) and not state):
            return
        raise pickle.UnpicklingError(f"refusing to set state on a {type(inst).__name__}")

    def load_setitem(self):
        _check_keys(self.stack[-2:-1])
        super().load_setitem()

    def load_setitems(self):
        _check_keys(self.stack[::2])
        super().load_setitems()

    def load_dict(self):
        _check_keys(self.stack[::2])
        super().load_dict()

    def load_additems(self):
        _check_keys(self.stack)
        super().load_additems()

    def load_frozenset(self):
        _check_keys(self.stack)
        super().load_frozenset()

    for _name, _code in (("load_build", pickle.BUILD), ("load_setitem", pickle.SETITEM), ("load_setitems", pickle.SETITEMS),
                         ("load_dict", pickle.DICT), ("load_additems", pickle.ADDITEMS), ("load_frozenset", pickle.FROZENSET)):
        dispatch[_code[0]] = _counted(locals()[_name])
    del _name, _code


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _legacy_storage(f: io.BytesIO, budget: _Budget) -> torch.TypedStorage:
    """One storage saved in torch's legacy (pre-zip) format: five pickles, then the element count and the bytes."""
    keys = {}

    def load(persistent: bool = False):
        unpickler = SafeUnpickler(f, budget)
        if persistent:
            def persistent_load(pid):
                if not (type(pid) is tuple and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                        and isinstance(pid[2], str) and isinstance(pid[4], int) and (len(pid) == 5 or pid[5] is None)):
                    raise pickle.UnpicklingError("malformed storage reference")
                keys[pid[2]] = pid[1].dtype
                return pid[2]
            unpickler.persistent_load = persistent_load
        return unpickler.load()

    if load() != _LEGACY_MAGIC:
        raise pickle.UnpicklingError("tensor storage bytes are not a torch storage")
    load()                                           # protocol version
    if not isinstance(load(), dict):                 # system info
        raise pickle.UnpicklingError("malformed torch storage header")
    key = load(persistent=True)
    if not isinstance(key, str) or load() != [key] or set(keys) != {key}:
        raise pickle.UnpicklingError("tensor storage bytes hold something other than one storage")
    dtype = keys[key]
    count = int.from_bytes(f.read(8), "little", signed=True)
    size = torch.empty([], dtype=dtype).element_size()
    data = f.read(count * size) if 0 <= count <= len(f.getbuffer()) else b""
    if count < 0 or len(data) != count * size:
        raise pickle.UnpicklingError("tensor storage bytes are truncated")
    return _storage(data, dtype)


def check_object_graph(obj, budget: int, source: str) -> None:
    """Walk what a weights file loaded to, each object once: refuse cycles, nesting deeper than MAX_PICKLE_DEPTH,
    and a graph that unfolds (shared parts counted once per path, strings by length) to more than `budget`.

    Whatever later walks, prints or compares the loaded objects then costs at most `budget` steps.
    """
    unfolded: dict[int, int] = {}
    active: set[int] = set()

    def children(x):
        if isinstance(x, dict):
            return [*x.keys(), *x.values()]
        if isinstance(x, (list, tuple, set, frozenset)):
            return x
        if isinstance(x, PersistentRecord):
            return [x.state]
        if isinstance(x, _PlainNamespace):
            return [vars(x)]
        return ()

    def size(x, depth: int) -> int:
        if isinstance(x, (str, bytes, bytearray)):
            return 1 + len(x)
        key = id(x)
        if key in unfolded:
            return unfolded[key]
        if depth > MAX_PICKLE_DEPTH:
            raise WeightsError(f"{source}: refusing objects nested deeper than {MAX_PICKLE_DEPTH}")
        if key in active:
            raise WeightsError(f"{source}: refusing an object that contains itself")
        active.add(key)
        total = 1
        for child in children(x):
            total += size(child, depth + 1)
            if total > budget:
                raise WeightsError(f"{source}: refusing an object graph that unfolds to more than {budget} objects "
                                   "(shared parts counted once per path); the file is malformed or hostile")
        active.discard(key)
        unfolded[key] = total
        return total

    size(obj, 0)


def _graph_budget(file_size: int) -> int:
    return max(1 << 20, 4 * file_size)


def safe_unpickle(path: str | os.PathLike):
    """Unpickle a file with `SafeUnpickler`; errors become WeightsError naming the file."""
    with open(path, "rb") as f:
        data = f.read()
    result = _safe_load(path, lambda budget: SafeUnpickler(io.BytesIO(data), budget).load(), len(data), "pickle")
    check_object_graph(result, _graph_budget(len(data)), str(path))
    return result


def _safe_load(path, load, file_size: int, what: str):
    """Run `load(budget)`; any failure of a malformed file becomes one WeightsError line."""
    try:
        return load(_Budget(file_size))
    except WeightsError:
        raise
    except pickle.UnpicklingError as e:
        message = _first_line(e)
        if message.startswith("refusing"):
            raise WeightsError(f"{path}: {message}") from None
        raise WeightsError(f"{path}: truncated or corrupt {what} ({message})") from None
    except MemoryError:
        raise WeightsError(f"{path}: truncated or corrupt {what} (it asks for more memory than there is)") from None
    except Exception as e:   # noqa: BLE001 - nothing from the file runs, so any other error is a malformed file
        raise WeightsError(f"{path}: truncated or corrupt {what} ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else ""


# ----------------------------------------------------------------------------
# NVIDIA pickles.

_NVIDIA_MAPPING_KEYS = {"num_layers", "lr_multiplier", "w_avg_beta", "activation", "embed_features", "layer_features"}
_NVIDIA_SYNTHESIS_KEYS = {"channel_base", "channel_max", "num_fp16_res", "conv_clamp", "architecture", "resample_filter",
                          "use_noise", "fused_modconv_default", "fp16_channels_last", "channels_last", "activation"}
_NVIDIA_GENERATOR_KEYS = {"z_dim", "c_dim", "w_dim", "img_resolution", "img_channels", "mapping_kwargs", "synthesis_kwargs"}


def _flatten_record(record: PersistentRecord, prefix: str = "", seen: set[int] | None = None) -> dict[str, torch.Tensor]:
    """Parameters and buffers of a persistent nn.Module record, by dotted name; each submodule is visited once
    (a submodule reached twice is refused: StyleGAN2 generators share none)."""
    seen = set() if seen is None else seen
    if id(record) in seen:
        raise WeightsError(f"submodule {prefix.rstrip('.') or 'the top'} appears more than once in the network")
    if prefix.count(".") >= MAX_PICKLE_DEPTH:
        raise WeightsError(f"modules nested deeper than {MAX_PICKLE_DEPTH} at {prefix[:200]}")
    seen.add(id(record))
    out = {}
    state = record.state
    for group in ("_parameters", "_buffers", "_modules"):
        if not isinstance(state.get(group) or {}, dict):
            raise WeightsError(f"malformed module record at {prefix or 'the top'}: {group} is not a mapping")
    for group in ("_parameters", "_buffers"):
        for name, tensor in (state.get(group) or {}).items():
            if tensor is not None:
                if not isinstance(tensor, torch.Tensor) or not isinstance(name, str):
                    raise WeightsError(f"{prefix}{name} is not a tensor")
                out[prefix + name] = tensor
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, PersistentRecord) or not isinstance(name, str):
            raise WeightsError(f"unsupported submodule {prefix}{name} ({type(child).__name__})")
        out.update(_flatten_record(child, f"{prefix}{name}.", seen))
    return out


def _nvidia_config(kwargs: dict, source: str) -> GeneratorConfig:
    """Our config from a Generator's init_kwargs: stylegan2-ada-pytorch nests the synthesis options in
    `synthesis_kwargs` (num_fp16_res defaults to 0); stylegan3-release's StyleGAN2 takes them at the top
    level (num_fp16_res defaults to 4)."""
    mapping = kwargs.get("mapping_kwargs") or {}
    if "synthesis_kwargs" in kwargs:
        synthesis = kwargs.get("synthesis_kwargs") or {}
        default_fp16_res = 0
    else:
        synthesis = {k: v for k, v in kwargs.items() if k not in _NVIDIA_GENERATOR_KEYS}
        default_fp16_res = 4
    if not isinstance(mapping, dict) or not isinstance(synthesis, dict):
        raise WeightsError(f"{source}: malformed generator init_kwargs")
    mapping, synthesis = dict(mapping), dict(synthesis)
    if kwargs.get("c_dim", 0):
        raise WeightsError(f"{source}: conditional generators (c_dim={kwargs['c_dim']}) are not supported")
    unknown = sorted(set(mapping) - _NVIDIA_MAPPING_KEYS) + sorted(set(synthesis) - _NVIDIA_SYNTHESIS_KEYS)
    if unknown:
        raise WeightsError(f"{source}: unsupported generator options {unknown}")
    if synthesis.get("architecture", "skip") != "skip":
        raise WeightsError(f"{source}: only the 'skip' synthesis architecture is supported, got {synthesis['architecture']!r}")
    if mapping.get("activation", "lrelu") != "lrelu" or synthesis.get("activation", "lrelu") != "lrelu":
        raise WeightsError(f"{source}: only the lrelu activation is supported")
    if list(synthesis.get("resample_filter", [1, 3, 3, 1])) != [1, 3, 3, 1]:
        raise WeightsError(f"{source}: only the [1,3,3,1] resample filter is supported")
    if synthesis.get("use_noise", True) is False:
        raise WeightsError(f"{source}: generators without noise inputs are not supported")
    for key in ("embed_features", "layer_features"):
        if mapping.get(key) not in (None, kwargs.get("w_dim")):
            raise WeightsError(f"{source}: mapping {key}={mapping[key]} is not supported")
    try:
        return GeneratorConfig(
            resolution=int(kwargs["img_resolution"]),
            z_dim=int(kwargs["z_dim"]),
            w_dim=int(kwargs["w_dim"]),
            img_channels=int(kwargs["img_channels"]),
            mapping_layers=int(mapping.get("num_layers", 8)),
            mapping_lr_multiplier=float(mapping.get("lr_multiplier", 0.01)),
            channel_base=int(synthesis.get("channel_base", 32768)),
            channel_max=int(synthesis.get("channel_max", 512)),
            num_fp16_res=int(synthesis.get("num_fp16_res", default_fp16_res)),
            conv_clamp=None if synthesis.get("conv_clamp") is None else float(synthesis["conv_clamp"]),
        )
    except KeyError as e:
        raise WeightsError(f"{source}: generator init_kwargs lack {e}") from None
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{source}: invalid generator options: {e}") from None


def _nvidia_name_table(config: GeneratorConfig) -> tuple[dict[str, str], list[str]]:
    """(our name -> NVIDIA name, NVIDIA fixed-filter buffers to check)."""
    table = {"mapping.w_avg": "mapping.w_avg"}
    filters = []
    for i in range(config.mapping_layers):
        for p in ("weight", "bias"):
            table[f"mapping.fc{i}.{p}"] = f"mapping.fc{i}.{p}"
    for res in config.block_resolutions:
        b = f"synthesis.b{res}"
        layers = ["conv1"] if res == 4 else ["conv0", "conv1"]
        filters.append(f"{b}.resample_filter")
        if res == 4:
            table[f"{b}.const"] = f"{b}.const"
        for layer in layers:
            for p in ("affine.weight", "affine.bias", "weight", "bias", "noise_strength", "noise_const"):
                table[f"{b}.{layer}.{p}"] = f"{b}.{layer}.{p}"
            filters.append(f"{b}.{layer}.resample_filter")
        for p in ("affine.weight", "affine.bias", "weight", "bias"):
            table[f"{b}.torgb.{p}"] = f"{b}.torgb.{p}"
    return table, filters


def convert_nvidia(G_ema: PersistentRecord, source: str) -> Generator:
    kwargs = G_ema.state.get("_init_kwargs")
    if not isinstance(kwargs, dict):
        raise WeightsError(f"{source}: G_ema has no init_kwargs; is this a stylegan2-ada-pytorch pickle?")
    tensors = _flatten_record(G_ema)
    if any(k.startswith("synthesis.input.") for k in tensors):
        raise WeightsError(f"{source}: this is a StyleGAN3 (alias-free) generator; t2f runs StyleGAN2 generators only")
    config = _nvidia_config(dict(kwargs), source)
    table, filters = _nvidia_name_table(config)
    expected_filter = fir_filter(torch.float32)
    for name in filters:
        if name in tensors and not torch.allclose(tensors[name].float(), expected_filter, atol=1e-6):
            raise WeightsError(f"{source}: {name} is not the [1,3,3,1] filter")
    unused = sorted(set(tensors) - set(table.values()) - set(filters))
    if unused:
        raise WeightsError(f"{source}: unmatched tensors in the pickle: {', '.join(unused[:4])}")
    converted = {ours: tensors[theirs] for ours, theirs in table.items() if theirs in tensors}
    return build_checked(Generator, config, converted, source)


def load_nvidia_pickle(path: str | os.PathLike) -> Generator:
    data = safe_unpickle(path)
    if not isinstance(data, dict) or "G_ema" not in data:
        raise WeightsError(f"{path}: no 'G_ema' in the pickle; expected a stylegan2-ada-pytorch or stylegan3 network pickle")
    G_ema = data["G_ema"]
    if not isinstance(G_ema, PersistentRecord):
        raise WeightsError(f"{path}: 'G_ema' is not a persistent network object")
    return convert_nvidia(G_ema, str(path))


# ----------------------------------------------------------------------------
# rosinality stylegan2-pytorch checkpoints.


def _rosinality_name_table(config: GeneratorConfig) -> tuple[dict[str, tuple[str, tuple[int, ...] | None]], list[str]]:
    """(our name -> (rosinality name, reshape or None), rosinality fixed-filter buffers)."""
    table: dict[str, tuple[str, tuple[int, ...] | None]] = {}
    filters = []
    for i in range(config.mapping_layers):
        for p in ("weight", "bias"):
            table[f"mapping.fc{i}.{p}"] = (f"style.{i + 1}.{p}", None)
    table["mapping.w_avg"] = ("latent_avg", (config.w_dim,))

    def styled_conv(ours: str, theirs: str, noise: str, cin: int, cout: int, res: int):
        table[f"{ours}.weight"] = (f"{theirs}.conv.weight", (cout, cin, 3, 3))
        table[f"{ours}.affine.weight"] = (f"{theirs}.conv.modulation.weight", None)
        table[f"{ours}.affine.bias"] = (f"{theirs}.conv.modulation.bias", None)
        table[f"{ours}.noise_strength"] = (f"{theirs}.noise.weight", ())
        table[f"{ours}.bias"] = (f"{theirs}.activate.bias", None)
        table[f"{ours}.noise_const"] = (noise, (res, res))

    def to_rgb(ours: str, theirs: str, cin: int):
        table[f"{ours}.weight"] = (f"{theirs}.conv.weight", (config.img_channels, cin, 1, 1))
        table[f"{ours}.affine.weight"] = (f"{theirs}.conv.modulation.weight", None)
        table[f"{ours}.affine.bias"] = (f"{theirs}.conv.modulation.bias", None)
        table[f"{ours}.bias"] = (f"{theirs}.bias", (config.img_channels,))

    c4 = config.channels(4)
    table["synthesis.b4.const"] = ("input.input", (c4, 4, 4))
    styled_conv("synthesis.b4.conv1", "conv1", "noises.noise_0", c4, c4, 4)
    to_rgb("synthesis.b4.torgb", "to_rgb1", c4)
    for k, res in enumerate(config.block_resolutions[1:]):
        cin, cout = config.channels(res // 2), config.channels(res)
        styled_conv(f"synthesis.b{res}.conv0", f"convs.{2 * k}", f"noises.noise_{2 * k + 1}", cin, cout, res)
        styled_conv(f"synthesis.b{res}.conv1", f"convs.{2 * k + 1}", f"noises.noise_{2 * k + 2}", cout, cout, res)
        to_rgb(f"synthesis.b{res}.torgb", f"to_rgbs.{k}", cout)
        filters += [f"convs.{2 * k}.conv.blur.kernel", f"to_rgbs.{k}.upsample.kernel"]
    return table, filters


def _rosinality_config(state: dict[str, torch.Tensor], source: str) -> GeneratorConfig:
    try:
        n_mlp = 0
        while f"style.{n_mlp + 1}.weight" in state:
            n_mlp += 1
        style_dim = state["style.1.weight"].shape[0]
        num_convs = sum(1 for k in state if k.startswith("convs.") and k.endswith(".conv.weight"))
        resolution = 2 ** (num_convs // 2 + 2)
        top = state[f"convs.{num_convs - 1}.conv.weight"].shape[1] if num_convs else state["conv1.conv.weight"].shape[1]
        channel_max = max(v.shape[1] for k, v in state.items() if k.endswith(".conv.weight") and v.ndim == 5 and v.shape[-1] == 3)
        img_channels = state["to_rgb1.conv.weight"].shape[1]
    except (KeyError, IndexError, AttributeError) as e:
        raise WeightsError(f"{source}: not a rosinality StyleGAN2 generator state ({e} missing)") from None
    try:
        return GeneratorConfig(resolution=resolution, z_dim=style_dim, w_dim=style_dim, img_channels=img_channels,
                               mapping_layers=n_mlp, channel_base=top * resolution, channel_max=channel_max)
    except ValueError as e:
        raise WeightsError(f"{source}: {e}") from None


def convert_rosinality(state: dict[str, torch.Tensor], source: str) -> Generator:
    config = _rosinality_config(state, source)
    table, filters = _rosinality_name_table(config)
    expected_filter = fir_filter(torch.float32) * 4
    for name in filters:
        if name in state and not torch.allclose(state[name].float(), expected_filter, atol=1e-6):
            raise WeightsError(f"{source}: {name} is not the [1,3,3,1] filter")
    used = {theirs for theirs, _ in table.values()}
    unused = sorted(set(state) - used - set(filters))
    if unused:
        raise WeightsError(f"{source}: unmatched tensors in the checkpoint: {', '.join(unused[:4])}")
    converted = {}
    for ours, (theirs, shape) in table.items():
        if theirs not in state:
            continue
        tensor = state[theirs]
        if shape is not None:
            if tensor.numel() != int(np.prod(shape)):
                raise WeightsError(f"{source}: {theirs} has shape {tuple(tensor.shape)}, expected {shape}")
            tensor = tensor.reshape(shape)
        converted[ours] = tensor
    return build_checked(Generator, config, converted, source)


def safe_load_checkpoint(path: str | os.PathLike):
    """A torch zip checkpoint (torch.save's format) unpickled with `SafeUnpickler`, never by torch.load.

    Its storages must be stored uncompressed (torch.save never compresses), so nothing
    read from the archive is larger than the archive itself.
    """
    file_size = os.path.getsize(path)

    def load(budget: _Budget):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise WeightsError(f"{path}: not a torch checkpoint (no single */data.pkl in the archive)")
            prefix = pickles[0][: -len("data.pkl")]

            def read(name: str) -> bytes:
                info = archive.getinfo(name)
                if info.compress_type != zipfile.ZIP_STORED or info.file_size > file_size:
                    raise pickle.UnpicklingError(f"refusing a compressed or oversized archive entry {name}")
                return archive.read(info)

            if prefix + "byteorder" in names and read(prefix + "byteorder") != b"little":
                raise WeightsError(f"{path}: big-endian checkpoints are not supported")

            def storage(key: str) -> bytes:
                if not re.fullmatch(r"[A-Za-z0-9_.]+", key) or key.startswith("."):
                    raise pickle.UnpicklingError("malformed storage key")
                return read(f"{prefix}data/{key}")

            return SafeUnpickler(io.BytesIO(read(pickles[0])), budget, storages=storage).load()

    result = _safe_load(path, load, file_size, "checkpoint")
    check_object_graph(result, _graph_budget(file_size), str(path))
    return result


def load_rosinality(path: str | os.PathLike) -> Generator:
    ckpt = safe_load_checkpoint(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("g_ema"), dict):
        raise WeightsError(f"{path}: no 'g_ema' state dict; expected a rosinality stylegan2-pytorch checkpoint")
    state = dict(ckpt["g_ema"])
    if "latent_avg" not in ckpt:
        raise WeightsError(f"{path}: no 'latent_avg' in the checkpoint; save it beside g_ema (rosinality's convert_weight.py does)")
    state["latent_avg"] = ckpt["latent_avg"]
    return convert_rosinality(state, str(path))


# ----------------------------------------------------------------------------
# Converted directories and the entry point.


def save_generator(generator: Generator, directory: str | os.PathLike, overwrite: bool = False, **extra) -> Path:
    return save_model_dir(directory, GENERATOR_KIND, generator.config.to_dict(), generator.state_dict(), overwrite=overwrite, **extra)


def load_generator_dir(directory: str | os.PathLike) -> Generator:
    return load_model_dir(directory, GENERATOR_KIND, GeneratorConfig, Generator)[0]


def _is_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and head[1] >= 2 and not zipfile.is_zipfile(path)


def import_generator(source: str | os.PathLike) -> Generator:
    """A generator from a converted directory, an NVIDIA pickle or a rosinality checkpoint (no presets)."""
    try:
        return _import_generator(Path(source))
    except WeightsError:
        raise
    except OSError as e:
        raise WeightsError(f"{source}: cannot read ({e.strerror or e})") from None
    except (TypeError, AttributeError, KeyError, IndexError, ValueError, RuntimeError, ZeroDivisionError) as e:
        # A file that passed the safe loader but holds something other than a generator of a supported layout.
        raise WeightsError(f"{source}: not a supported StyleGAN2 generator ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _import_generator(path: Path) -> Generator:
    if path.is_dir():
        generator = load_generator_dir(path)
    elif path.is_file():
        if path.stat().st_size == 0:
            raise WeightsError(f"{path}: empty file")
        if zipfile.is_zipfile(path) or path.suffix in (".pt", ".pth"):
            generator = load_rosinality(path)
        elif _is_pickle(path):
            generator = load_nvidia_pickle(path)
        else:
            raise WeightsError(f"{path}: not a pickle, a torch checkpoint or a t2f directory")
    else:
        raise WeightsError(f"{path}: no such file or directory")
    return generator.eval().requires_grad_(False)
