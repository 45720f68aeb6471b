"""What t2f's restricted unpickler (t2f/unpickle.py) lets a weights file hold, and what it lets one cost.

The globals a pickle may name, each resolved to a checked stand-in (`SAFE_GLOBALS`; the three
that copy bytes or build tensors, `BUDGETED_GLOBALS`, are the unpickler's own methods), the
dict keys and set members allowed (flat scalars, so that they cannot be made to collide), and
`Budget`, a file's allowance of steps and bytes. t2f/unpickle.py states the bounds these give.
"""

from __future__ import annotations

import collections
import dataclasses
import pickle
import re

import numpy as np
import torch

MAX_PICKLE_OPS = 1 << 22          # Steps per file, whatever its size; NVIDIA's FFHQ pickle needs about 10^5.


@dataclasses.dataclass
class PersistentRecord:
    """What a `torch_utils.persistence` object becomes: its class name and state, never its code."""
    class_name: str
    state: dict


class PlainDict(dict):
    """Stand-in for dnnlib.util.EasyDict."""


class PlainNamespace:
    """Stand-in for argparse.Namespace (rosinality training checkpoints keep their arguments in one)."""


class StorageType:
    """Stand-in for torch.FloatStorage and its kin in a checkpoint's persistent ids: just the dtype."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


_STORAGE_TYPES = {name: StorageType(dtype) for name, dtype in (
    ("FloatStorage", torch.float32), ("HalfStorage", torch.float16), ("BFloat16Storage", torch.bfloat16),
    ("DoubleStorage", torch.float64), ("LongStorage", torch.int64), ("IntStorage", torch.int32),
    ("ShortStorage", torch.int16), ("CharStorage", torch.int8), ("ByteStorage", torch.uint8), ("BoolStorage", torch.bool))}

_KEY_SCALARS = (str, bytes, bool, type(None))
_MAX_INT_KEY = 1 << 31


def _is_key_scalar(x) -> bool:
    """str and bytes hash with a per-process random key; ints (optimizer state indices) must be small, so that
    distinct keys have distinct hashes (ints, floats and tuples hash without one: a file could collide them)."""
    return isinstance(x, _KEY_SCALARS) or (type(x) is int and -_MAX_INT_KEY <= x < _MAX_INT_KEY)


def check_keys(keys) -> None:
    """Dict keys and set members must hash in time linear in their size: scalars, or flat tuples of scalars."""
    for key in keys:
        if not (_is_key_scalar(key) or (type(key) is tuple and all(_is_key_scalar(k) for k in key))):
            raise pickle.UnpicklingError(f"refusing a {type(key).__name__} as a dict key or set member")


def _scalar_cost(x) -> int:
    """Steps to hash, compare or copy a scalar once: 1, plus 1 per 64 bytes of a string, 1 per 512 bits of an int."""
    if isinstance(x, (str, bytes, bytearray)):
        return 1 + len(x) // 64
    if type(x) is int:
        return 1 + x.bit_length() // 512
    return 1


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


def _ordered_dict(items=()):
    items = list(items)
    if not all(type(item) in (tuple, list) and len(item) == 2 for item in items):
        raise pickle.UnpicklingError("malformed OrderedDict")
    check_keys(k for k, _ in items)
    return collections.OrderedDict(items)


def _checked_set(kind):
    def build(items=()):
        items = list(items)
        check_keys(items)
        return kind(items)
    return build


SAFE_GLOBALS = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("builtins", "set"): _checked_set(set),
    ("builtins", "frozenset"): _checked_set(frozenset),
    ("__builtin__", "set"): _checked_set(set),
    ("__builtin__", "frozenset"): _checked_set(frozenset),
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent,
    ("dnnlib.util", "EasyDict"): PlainDict,
    ("argparse", "Namespace"): PlainNamespace,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    **{("torch", name): storage_type for name, storage_type in _STORAGE_TYPES.items()},
}
# Globals that need the unpickler's budget: resolved to its methods of these names.
BUDGETED_GLOBALS = {
    ("_codecs", "encode"): "latin1_bytes",
    ("torch._utils", "_rebuild_tensor_v2"): "rebuild_tensor",
    ("torch.storage", "_load_from_bytes"): "storage_from_bytes",
}


class Budget:
    """What one file may still cost: steps of work, bytes copied out of its data, tensor bytes materialized."""

    def __init__(self, file_size: int):
        self.ops = self.total_ops = min(MAX_PICKLE_OPS, (1 << 16) + 4 * file_size)
        self.copied_bytes = 2 * file_size + (1 << 20)    # protocol 2 copies a storage twice: latin1 text, then bytes
        self.tensor_bytes = 2 * file_size + (1 << 20)    # views of shared storages may repeat a little

    def spend(self, steps: int) -> None:
        self.ops -= steps
        if self.ops < 0:
            raise pickle.UnpicklingError(f"refusing a pickle that costs more than {self.total_ops} steps "
                                         "(what a file of its size may cost)")

    def copy(self, size: int) -> None:
        self.copied_bytes -= size
        if self.copied_bytes < 0:
            raise pickle.UnpicklingError("refusing a pickle that copies more bytes than the file holds")

    def walk(self, obj, depth: int = 4) -> None:
        """Pay for touching `obj` and what it holds, `depth` levels down (a call's arguments, a key's parts)."""
        self.spend(_scalar_cost(obj))
        if depth <= 0:
            return
        if isinstance(obj, dict):
            for key, value in obj.items():
                self.walk(key, depth - 1)
                self.walk(value, depth - 1)
        elif isinstance(obj, (tuple, list, set, frozenset)):
            self.spend(len(obj) // 64)
            for item in obj:
                self.walk(item, depth - 1)
