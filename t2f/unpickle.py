"""A restricted unpickler: weights files rebuilt as tensors and plain data, never as code.

NVIDIA's pickles (stylegan2-ada-pytorch, stylegan3-release) embed Python source that
`torch_utils.persistence` executes on load, and torch checkpoints are pickles too. Nothing
from a file runs here: `SafeUnpickler` rebuilds tensors, plain containers and numeric
scalars, turns each persistent object into a `PersistentRecord` (class name + state, the
source is ignored), and refuses any other global by name. `safe_unpickle` reads a plain
pickle, `safe_load_checkpoint` a torch zip checkpoint (torch.save's format); both refuse
anything malformed with one WeightsError line.

What it guarantees for any byte sequence of N bytes (docs/security.md states the bound):

- no code from the file runs (only the globals of t2f/unpickle_rules.py resolve, each a checked stand-in);
- work is at most min(2^22, 2^16 + 4N) steps, each of bounded cost: every opcode is one step,
  and every call the file makes (REDUCE, NEWOBJ, INST, OBJ), every state it sets (BUILD) and
  every dict key or set member also pays for the objects it touches (containers to four
  levels, str/bytes per 64 bytes, ints per 512 bits), so one small object referenced many
  times cannot multiply the work;
  dict keys are str, bytes, small ints or flat tuples of them, so they cannot be made to
  collide (str and bytes hash with a random key);
- tensor sizes, strides and offsets are checked against 2^63 before any arithmetic on them,
  so a huge integer costs its length to read and nothing more;
- memory: the bytes stand-ins copy out of the file (storages, latin1 strings) total at most
  2N + 1 MiB, the bytes read from a zip archive's entries total at most N (stored entries that
  do not overlap cannot hold more), and tensor views may not materialize more than 2N + 1 MiB
  (a stride-0 view over a small storage is refused);
- the loaded object graph is walked once per object, refusing cycles, nesting deeper than
  MAX_PICKLE_DEPTH and a graph whose unfolded size (shared parts once per path) exceeds
  max(2^20, 4N), so whatever later walks, prints or compares it is bounded too.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re
import warnings
import zipfile

import numpy as np
import torch

from .errors import first_line
from .files import open_regular_file
from .io import WeightsError
from .unpickle_rules import (BUDGETED_GLOBALS, SAFE_GLOBALS, Budget, PersistentRecord, PlainNamespace, StorageType,
                             check_keys)

MAX_PICKLE_DEPTH = 64             # Nesting of the loaded objects; a generator record needs about 10.
MAX_TENSOR_DIMS = 16
MAX_TENSOR_INDEX = 1 << 63        # Sizes, strides and offsets: torch's int64, checked before any arithmetic.

__all__ = ["MAX_PICKLE_DEPTH", "PersistentRecord", "SafeUnpickler", "check_object_graph", "safe_load_checkpoint", "safe_unpickle"]


def _counted(op):
    def run(self):
        self.budget.spend(1)
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
    """Unpickler that resolves only the globals in `SAFE_GLOBALS`, restricts BUILD and bounds its work.

    Built on the pure-Python unpickler so each opcode can be checked: BUILD may only restate
    a numpy dtype's own state, give a Namespace stand-in plain attributes, or set nothing;
    dict keys and set members must be flat scalars; every opcode counts against the budget.
    `storages` (a checkpoint's data/ entries by key) enables the persistent ids of torch's
    zip format; without it any persistent id is refused.
    """

    dispatch = {code: _counted(op) for code, op in pickle._Unpickler.dispatch.items()}

    def __init__(self, file, budget: Budget, storages=None):
        super().__init__(file)
        self.budget, self.storages, self.loaded_storages = budget, storages, {}

    def _keys(self, keys) -> None:
        """Check dict keys or set members and pay for hashing them."""
        keys = list(keys)
        check_keys(keys)
        for key in keys:
            self.budget.walk(key, 1)

    # Calls: each pays for its arguments before it runs.

    def load_reduce(self):
        self.budget.walk(self.stack[-1])
        super().load_reduce()

    def load_newobj(self):
        self.budget.walk(self.stack[-1])
        super().load_newobj()

    def load_newobj_ex(self):
        self.budget.walk(self.stack[-2:])
        super().load_newobj_ex()

    def _instantiate(self, klass, args):
        self.budget.walk(args)
        return super()._instantiate(klass, args)

    def find_class(self, module: str, name: str):
        if (module, name) in BUDGETED_GLOBALS:
            return getattr(self, BUDGETED_GLOBALS[(module, name)])
        try:
            return SAFE_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise pickle.UnpicklingError(f"refusing to load global '{module}.{name}': weights files may not run code") from None

    def persistent_load(self, pid):
        if self.storages is None:
            raise pickle.UnpicklingError("refusing persistent id in a plain pickle")
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)
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
        if not all(type(v) is int and 0 <= v < MAX_TENSOR_INDEX for v in (storage_offset, *size, *stride)):
            raise pickle.UnpicklingError("refusing a tensor size, stride or offset that is not an integer from 0 to 2**63")
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
        self.budget.copy(len(data))
        return _legacy_storage(io.BytesIO(data), self.budget)

    def latin1_bytes(self, text, encoding="latin1"):
        """Protocol-2 pickles spell bytes as _codecs.encode(text, 'latin1')."""
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise pickle.UnpicklingError("only latin1 byte strings are allowed")
        self.budget.copy(len(text))
        return text.encode("latin1")

    # Opcodes that hash keys or set state.

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        self.budget.walk(state, 1)                 # a shared state may be applied many times
        if isinstance(inst, np.dtype) and type(state) is tuple and state == inst.__reduce__()[2]:
            return
        if isinstance(inst, PlainNamespace) and type(state) is dict and all(type(k) is str for k in state):
            inst.__dict__.update(state)
            return
        if state is None or (isinstance(state, dict) and not state):
            return
        raise pickle.UnpicklingError(f"refusing to set state on a {type(inst).__name__}")

    def load_setitem(self):
        self._keys(self.stack[-2:-1])
        super().load_setitem()

    def load_setitems(self):
        self._keys(self.stack[::2])
        super().load_setitems()

    def load_dict(self):
        self._keys(self.stack[::2])
        super().load_dict()

    def load_additems(self):
        self._keys(self.stack)
        super().load_additems()

    def load_frozenset(self):
        self._keys(self.stack)
        super().load_frozenset()

    for _name, _code in (("load_build", pickle.BUILD), ("load_setitem", pickle.SETITEM), ("load_setitems", pickle.SETITEMS),
                         ("load_dict", pickle.DICT), ("load_additems", pickle.ADDITEMS), ("load_frozenset", pickle.FROZENSET),
                         ("load_reduce", pickle.REDUCE), ("load_newobj", pickle.NEWOBJ), ("load_newobj_ex", pickle.NEWOBJ_EX)):
        dispatch[_code[0]] = _counted(locals()[_name])
    del _name, _code


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _legacy_storage(f: io.BytesIO, budget: Budget) -> torch.TypedStorage:
    """One storage saved in torch's legacy (pre-zip) format: five pickles, then the element count and the bytes."""
    keys = {}

    def load(persistent: bool = False):
        unpickler = SafeUnpickler(f, budget)
        if persistent:
            def persistent_load(pid):
                if not (type(pid) is tuple and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)
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
        if isinstance(x, PlainNamespace):
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
    with open_regular_file(path) as f:
        data = f.read()
    result = _safe_load(path, lambda budget: SafeUnpickler(io.BytesIO(data), budget).load(), len(data), "pickle")
    check_object_graph(result, _graph_budget(len(data)), str(path))
    return result


def _safe_load(path, load, file_size: int, what: str):
    """Run `load(budget)`; any failure of a malformed file becomes one WeightsError line."""
    try:
        return load(Budget(file_size))
    except WeightsError:
        raise
    except pickle.UnpicklingError as e:
        message = first_line(e, limit=200)
        if message.startswith("refusing"):
            raise WeightsError(f"{path}: {message}") from None
        raise WeightsError(f"{path}: truncated or corrupt {what} ({message})") from None
    except MemoryError:
        raise WeightsError(f"{path}: truncated or corrupt {what} (it asks for more memory than there is)") from None
    except Exception as e:   # noqa: BLE001 - nothing from the file runs, so any other error is a malformed file
        raise WeightsError(f"{path}: truncated or corrupt {what} ({first_line(e, typed=True, limit=200)})") from None



def safe_load_checkpoint(path: str | os.PathLike):
    """A torch zip checkpoint (torch.save's format) unpickled with `SafeUnpickler`, never by torch.load.

    Its entries must be stored uncompressed (torch.save never compresses), and the entries read
    may hold no more bytes in all than the archive: stored entries that do not overlap cannot,
    so overlapping entries (each one the whole file) are refused before they are read, on any
    Python (zipfile's own overlap check came after 3.11.7).
    """
    with open_regular_file(path) as f:
        file_size = os.fstat(f.fileno()).st_size

        def load(budget: Budget):
            with zipfile.ZipFile(f) as archive:
                return _load_archive(archive, budget, file_size, path)

        result = _safe_load(path, load, file_size, "checkpoint")
    check_object_graph(result, _graph_budget(file_size), str(path))
    return result


def _load_archive(archive: zipfile.ZipFile, budget: Budget, file_size: int, path):
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise WeightsError(f"{path}: not a torch checkpoint (no single */data.pkl in the archive)")
    prefix = pickles[0][: -len("data.pkl")]
    unread = [file_size]                                   # bytes the entries still to be read may hold in all

    def read(name: str) -> bytes:
        info = archive.getinfo(name)
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise pickle.UnpicklingError(f"refusing a compressed archive entry {name}")
        unread[0] -= info.file_size
        if unread[0] < 0 or info.header_offset + info.file_size > file_size:
            raise pickle.UnpicklingError(f"refusing archive entries that hold more bytes in all than the file "
                                         f"({file_size}): they overlap (at {name})")
        return archive.read(info)

    if prefix + "byteorder" in names and read(prefix + "byteorder") != b"little":
        raise WeightsError(f"{path}: big-endian checkpoints are not supported")

    def storage(key: str) -> bytes:
        if not re.fullmatch(r"[A-Za-z0-9_.]+", key) or key.startswith("."):
            raise pickle.UnpicklingError("malformed storage key")
        return read(f"{prefix}data/{key}")

    return SafeUnpickler(io.BytesIO(read(pickles[0])), budget, storages=storage).load()


