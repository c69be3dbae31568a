"""Read PyTorch checkpoints without torch, and without executing anything from them.

`torch.save` (torch >= 1.6) writes a zip: `<archive>/data.pkl` is a pickle of the saved object whose
tensors point, through pickle "persistent ids", at raw little-endian storages in `<archive>/data/<key>`.
The pickle is read by an unpickler that resolves only the handful of globals a state dict needs (the
ones torch's `weights_only=True` admits for it) and refuses every other global, so a hostile file can
name `os.system` but never reach it.
"""

import collections
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import mlx.core as mx
import numpy as np

ZIP_MAGIC = b"PK\x03\x04"
# what torch.save wrote before 1.6: a pickled magic number, then more pickles
LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"
RESAVE_HINT = (
    "re-save it with a torch >= 1.6: "
    "torch.save(torch.load(OLD, map_location='cpu'), NEW) "
    "(or pass _use_new_zipfile_serialization=True)"
)


class CheckpointError(ValueError):
    """A checkpoint that cannot (or must not) be read; the message is one line for the user."""


class _Frozen:
    """Objects the pickle can reach are read-only: BUILD/SETATTR opcodes cannot alter them."""

    __slots__ = ()

    def __init__(self, **fields):
        for k, v in fields.items():
            object.__setattr__(self, k, v)

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is read-only")

    __delattr__ = __setattr__


class _Storage(_Frozen):
    """Marker for `torch.<X>Storage` globals: the numpy dtype its bytes decode as."""

    __slots__ = ("name", "dtype", "bfloat16")

    def __init__(self, name: str, dtype: str, bfloat16: bool = False):
        super().__init__(name=name, dtype=np.dtype(dtype), bfloat16=bfloat16)


class _Function(_Frozen):
    """An allowed global function, wrapped so the pickle cannot reach its attributes."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        super().__init__(fn=fn)

    def __call__(self, *args):
        return self.fn(*args)


_STORAGES = {
    s.name: s
    for s in (
        _Storage("FloatStorage", "<f4"),
        _Storage("DoubleStorage", "<f8"),
        _Storage("HalfStorage", "<f2"),
        _Storage("BFloat16Storage", "<u2", bfloat16=True),
        _Storage("LongStorage", "<i8"),
        _Storage("IntStorage", "<i4"),
        _Storage("ShortStorage", "<i2"),
        _Storage("CharStorage", "i1"),
        _Storage("ByteStorage", "u1"),
        _Storage("BoolStorage", "?"),
    )
}


class _StorageData(_Frozen):
    """One storage read from the zip: a flat numpy array of its elements."""

    __slots__ = ("kind", "flat")

    def __init__(self, kind: _Storage, flat: np.ndarray):
        super().__init__(kind=kind, flat=flat)


class _Tensor(_Frozen):
    """A tensor rebuilt from a storage: a contiguous numpy array (bf16 held as uint16)."""

    __slots__ = ("array", "bfloat16")

    def __init__(self, array: np.ndarray, bfloat16: bool):
        super().__init__(array=array, bfloat16=bfloat16)

    @property
    def shape(self):
        return self.array.shape

    def to_mlx(self) -> mx.array:
        if not isinstance(self.array, np.ndarray):
            raise CheckpointError("corrupt tensor in checkpoint")
        a = mx.array(self.array)
        return a.view(mx.bfloat16) if self.bfloat16 else a


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> _Tensor:
    # torch._utils._rebuild_tensor(_v2)(storage, offset, size, stride, requires_grad, hooks[, metadata])
    if not isinstance(storage, _StorageData):
        raise pickle.UnpicklingError("tensor without a storage")
    if not (
        _is_int(storage_offset)
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
        and len(size) == len(stride)
        and all(_is_int(v) and v >= 0 for v in size + stride)
        and storage_offset >= 0
    ):
        raise pickle.UnpicklingError("malformed tensor size/stride/offset")
    flat = storage.flat
    if 0 in size:
        array = np.zeros(size, dtype=flat.dtype)
    else:
        # bounds check before as_strided, which would otherwise read outside the buffer
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= flat.size:
            raise pickle.UnpicklingError(
                f"tensor of size {size} stride {stride} offset {storage_offset} "
                f"reaches past its storage of {flat.size} elements"
            )
        numel = int(np.prod(size))
        contiguous = tuple(int(np.prod(size[i + 1 :])) for i in range(len(size)))
        if all(n == 1 or s == c for n, s, c in zip(size, stride, contiguous)):
            # the common case: a plain slice of the storage, no copy needed here
            array = flat[storage_offset : storage_offset + numel].reshape(size)
        else:
            base = flat[storage_offset:]
            item = flat.itemsize
            array = np.lib.stride_tricks.as_strided(
                base, shape=size, strides=tuple(s * item for s in stride), writeable=False
            )
            array = np.array(array, copy=True, order="C")
    return _Tensor(array, storage.kind.bfloat16)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *_ignored):
    if not isinstance(data, _Tensor):
        raise pickle.UnpicklingError("parameter without tensor data")
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return _rebuild_parameter(data)


def _codecs_encode(obj, encoding="utf-8"):
    # protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1')
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("unexpected _codecs.encode call")
    return obj.encode("latin1")


def _ordered_dict(*args):
    if args and not (len(args) == 1 and isinstance(args[0], (list, tuple))):
        raise pickle.UnpicklingError("unexpected OrderedDict arguments")
    return collections.OrderedDict(*args)


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): _Function(_ordered_dict),
    ("torch._utils", "_rebuild_tensor"): _Function(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _Function(_rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): _Function(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Function(_rebuild_parameter_with_state),
    ("torch", "Size"): _Function(tuple),
    ("_codecs", "encode"): _Function(_codecs_encode),
}
for _module in ("builtins", "__builtin__"):  # protocol 2 spells builtins as __builtin__
    _ALLOWED_GLOBALS[(_module, "set")] = _Function(set)
    _ALLOWED_GLOBALS[(_module, "frozenset")] = _Function(frozenset)
for _name, _kind in _STORAGES.items():
    _ALLOWED_GLOBALS[("torch", _name)] = _kind


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, zf: zipfile.ZipFile, prefix: str, big_endian: bool):
        super().__init__(io.BytesIO(data))
        self._zf = zf
        self._prefix = prefix
        self._big_endian = big_endian
        self._storages: Dict[str, _StorageData] = {}

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not allowed in a weights-only checkpoint "
                "(only state dicts can be read: save with torch.save(model.state_dict(), path))"
            ) from None

    def persistent_load(self, pid):
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _Storage)
            and isinstance(pid[2], str)
            and _is_int(pid[4])
            and pid[4] >= 0
        ):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, kind, key, _location, numel = pid
        if key in self._storages:
            return self._storages[key]
        try:
            info = self._zf.getinfo(f"{self._prefix}/data/{key}")
        except KeyError:
            raise pickle.UnpicklingError(f"storage {key!r} missing from the archive") from None
        dtype = kind.dtype.newbyteorder(">") if self._big_endian else kind.dtype
        # checked before reading, so a lying header cannot make us inflate more than promised
        if info.file_size != numel * dtype.itemsize:
            raise pickle.UnpicklingError(
                f"storage {key!r} has {info.file_size} bytes, expected {numel} x {dtype.itemsize}"
            )
        raw = self._zf.read(info)
        flat = np.frombuffer(raw, dtype=dtype)
        if self._big_endian:
            flat = flat.astype(kind.dtype)
        data = _StorageData(kind, flat)
        self._storages[key] = data
        return data


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return text[:limit] or type(e).__name__


def _load_torch_zip(path: Path) -> Any:
    try:
        with zipfile.ZipFile(path) as zf:
            pkls = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pkls) != 1:
                raise CheckpointError(f"{path}: a zip file but not a torch.save checkpoint (no data.pkl)")
            prefix = pkls[0].rsplit("/", 1)[0]
            big_endian = False
            if f"{prefix}/byteorder" in zf.namelist():
                order = zf.read(f"{prefix}/byteorder").decode("ascii", "replace").strip()
                if order not in ("little", "big"):
                    raise CheckpointError(f"{path}: unknown byte order {order!r}")
                big_endian = order == "big"
            data = zf.read(pkls[0])
            try:
                return _RestrictedUnpickler(data, zf, prefix, big_endian).load()
            except pickle.UnpicklingError as e:
                raise CheckpointError(f"{path}: refused: {e}") from None
            except zipfile.BadZipFile:
                raise
            except Exception as e:  # anything else the unpickler trips on means a damaged file
                raise CheckpointError(
                    f"{path}: corrupt checkpoint pickle ({type(e).__name__}: {_one_line(e)})"
                ) from None
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint zip ({_one_line(e)})") from None
    except zipfile.LargeZipFile as e:
        raise CheckpointError(f"{path}: {e}") from None


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(ZIP_MAGIC) or (zipfile.is_zipfile(path) and head[:2] == b"PK"):
        return "zip"
    if head.startswith(LEGACY_MAGIC):
        return "legacy"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "legacy"  # torch's oldest (tar) format
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1:
        return "safetensors"
    return "unknown"


def _flatten_tensors(obj) -> Optional[Dict[str, _Tensor]]:
    """The mapping if obj is a dict of name -> tensor (a state dict), else None."""
    if isinstance(obj, dict) and obj and all(
        isinstance(k, str) and isinstance(v, _Tensor) for k, v in obj.items()
    ):
        return dict(obj)
    return None


STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "module")
CONFIG_KEYS = ("config", "model_config", "model_kwargs", "hparams")


def _unwrap(obj, path: Path) -> Tuple[Dict[str, _Tensor], Optional[dict]]:
    sd = _flatten_tensors(obj)
    if sd is not None:
        return sd, None
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            sd = _flatten_tensors(obj.get(key))
            if sd is not None:
                config = None
                for ck in CONFIG_KEYS:
                    if isinstance(obj.get(ck), dict):
                        config = obj[ck]
                        break
                return sd, config
    raise CheckpointError(
        f"{path}: no state dict found (expected a dict of tensors, or one under "
        + "/".join(repr(k) for k in STATE_DICT_KEYS)
        + ")"
    )


def read_checkpoint(path) -> Tuple[Dict[str, mx.array], Optional[dict]]:
    """Read the state dict of a checkpoint, never executing anything from it.

    Args:
        path: a `torch.save` zip (.pt/.pth/.bin, any name) or a .safetensors file.

    Returns:
        (state_dict, config): tensor names -> mx.array in their stored dtype, and the config dict
        stored next to the state dict in a wrapper ({"model": sd, "config": {...}}) or None.

    Raises:
        CheckpointError: missing, unreadable, corrupt, legacy-format or hostile file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file")
    try:
        kind = _sniff(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if kind == "zip":
        sd, config = _unwrap(_load_torch_zip(path), path)
        return {k: v.to_mlx() for k, v in sd.items()}, config
    if kind == "safetensors":
        try:
            weights = mx.load(str(path))
        except Exception as e:  # mlx raises RuntimeError/ValueError with its own wording
            raise CheckpointError(f"{path}: corrupt safetensors file ({_one_line(e)})") from None
        if not isinstance(weights, dict) or not weights:
            raise CheckpointError(f"{path}: safetensors file holds no tensors")
        return weights, None
    if kind == "legacy":
        raise CheckpointError(f"{path}: legacy (pre-1.6) torch.save format is not supported; {RESAVE_HINT}")
    if kind == "pickle":
        raise CheckpointError(f"{path}: a bare pickle, not a torch.save zip checkpoint; {RESAVE_HINT}")
    raise CheckpointError(f"{path}: not a checkpoint (expected a torch.save zip or .safetensors file)")
