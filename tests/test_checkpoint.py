"""convert.checkpoint: reading torch.save zips without torch, and refusing anything that is not weights."""

import io
import json
import os
import pickle
import zipfile

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES

from convert.checkpoint import CheckpointError, read_checkpoint

CK = FIXTURES / "convert"


def test_reads_real_torch_file_exactly():
    sd, config = read_checkpoint(CK / "tensors.pt")
    ref = np.load(CK / "tensors.npz")
    dtypes = json.loads(str(ref["__dtypes__"]))
    assert config is None
    assert set(sd) == set(dtypes)
    expect_dtype = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16, "int64": mx.int64,
                    "bool": mx.bool_, "float64": mx.float32}
    for key, value in sd.items():
        assert value.dtype == expect_dtype[dtypes[key]], key
        got = np.array(value.astype(mx.float32)) if value.dtype == mx.bfloat16 else np.array(value)
        want = ref[key].astype(np.float32) if dtypes[key] == "float64" else ref[key]
        assert got.shape == want.shape, key
        np.testing.assert_array_equal(got, want, err_msg=key)


def test_stride_zero_memory_parameters():
    # heads=2: titans-pytorch stores memory_model_parameters.* as stride-0 views of the template
    sd, _ = read_checkpoint(CK / "nm_tiny.pt")
    w = np.array(sd["memory_model_parameters.1"])
    assert w.shape == (2, 8, 32)
    np.testing.assert_array_equal(w[0], w[1])
    np.testing.assert_array_equal(w[0], np.array(sd["memory_model.model.weights.0"]))


def test_wrapper_with_config():
    sd, config = read_checkpoint(CK / "mac_wrapped.pt")
    plain, _ = read_checkpoint(CK / "mac_tiny.pt")
    assert set(sd) == set(plain)
    assert config == json.loads((CK / "mac_tiny.json").read_text())


def test_safetensors(tmp_path):
    path = tmp_path / "w.safetensors"
    mx.save_safetensors(str(path), {"a": mx.arange(6).reshape(2, 3).astype(mx.bfloat16)})
    sd, config = read_checkpoint(path)
    assert sd["a"].dtype == mx.bfloat16 and sd["a"].shape == (2, 3)


# ---- hostile and broken files --------------------------------------------------------------------------------------


class _Shell:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Eval:
    def __reduce__(self):
        return eval, ("__import__('os').system('true')",)


def torch_like_zip(path, payload: bytes, storages=None):
    """A zip laid out like torch.save's, holding an arbitrary data.pkl."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")
        for key, raw in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", raw)
    return path


def _global_bytes(module, name):
    return f"c{module}\n{name}\n".encode()


def fake_tensor_pickle(size, stride, offset, numel, storage="FloatStorage", key="0", location="cpu"):
    """data.pkl bytes for {'w': _rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())}."""
    def tup(xs):
        return b"(" + b"".join(b"K" + bytes([x]) for x in xs) + b"t"

    pid = (b"(X\x07\x00\x00\x00storage" + _global_bytes("torch", storage)
           + b"X" + len(key).to_bytes(4, "little") + key.encode()
           + b"X" + len(location).to_bytes(4, "little") + location.encode() + b"K" + bytes([numel]) + b"tQ")
    args = (b"(" + pid + b"K" + bytes([offset]) + tup(size) + tup(stride) + b"\x89"
            + _global_bytes("collections", "OrderedDict") + b")Rt")
    return (b"\x80\x02}(X\x01\x00\x00\x00w" + _global_bytes("torch._utils", "_rebuild_tensor_v2") + args + b"Ru.")


@pytest.mark.parametrize("location", ["cpu", "cuda:0"])  # train_mac.py saves from the GPU
def test_fake_tensor_pickle_is_understood(tmp_path, location):
    raw = np.arange(6, dtype="<f4").tobytes()
    path = torch_like_zip(tmp_path / "ok.pt", fake_tensor_pickle((2, 2), (1, 2), 1, 6, location=location), {"0": raw})
    sd, _ = read_checkpoint(path)
    np.testing.assert_array_equal(np.array(sd["w"]), np.array([[1, 3], [2, 4]], np.float32))


@pytest.mark.parametrize(
    "size,stride,offset,numel,nbytes,match",
    [
        ((2, 3), (3, 1), 1, 6, 24, "reaches past its storage"),  # last element out of bounds
        ((4,), (2,), 0, 6, 24, "reaches past its storage"),
        ((2,), (1,), 0, 6, 20, "has 20 bytes"),  # storage shorter than it claims
    ],
)
def test_out_of_bounds_views_refused(tmp_path, size, stride, offset, numel, nbytes, match):
    path = torch_like_zip(tmp_path / "bad.pt", fake_tensor_pickle(size, stride, offset, numel), {"0": b"\0" * nbytes})
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(path)


def test_missing_storage_refused(tmp_path):
    path = torch_like_zip(tmp_path / "bad.pt", fake_tensor_pickle((2,), (1,), 0, 2, key="../../x"))
    with pytest.raises(CheckpointError, match="missing from the archive"):
        read_checkpoint(path)


def test_unknown_storage_type_refused(tmp_path):
    path = torch_like_zip(tmp_path / "bad.pt", fake_tensor_pickle((2,), (1,), 0, 2, storage="ComplexStorage"))
    with pytest.raises(CheckpointError, match="torch.ComplexStorage is not allowed"):
        read_checkpoint(path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_os_system_never_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"w": _Shell(f"touch {marker}")}, protocol=protocol)
    path = torch_like_zip(tmp_path / "evil.pt", payload)
    with pytest.raises(CheckpointError, match=r"global (posix|nt|os)\.system is not allowed"):
        read_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload,name",
    [
        (pickle.dumps(_Eval(), protocol=2), "(__builtin__|builtins).eval"),
        (b"\x80\x02" + _global_bytes("builtins", "getattr") + b".", "builtins.getattr"),
        (b"\x80\x02" + _global_bytes("torch", "load") + b".", "torch.load"),
        (b"\x80\x02" + _global_bytes("numpy.core.multiarray", "_reconstruct") + b".", "numpy.core.multiarray._reconstruct"),
        (b"\x80\x02" + _global_bytes("subprocess", "Popen") + b".", "subprocess.Popen"),
    ],
)
def test_foreign_globals_refused(tmp_path, payload, name):
    path = torch_like_zip(tmp_path / "evil.pt", payload)
    with pytest.raises(CheckpointError, match=f"global {name} is not allowed"):
        read_checkpoint(path)


def test_build_cannot_modify_allowed_globals(tmp_path):
    # BUILD on an allowed global (to alter the reader for later files) must fail, not take effect
    payload = (b"\x80\x02" + _global_bytes("torch", "FloatStorage")
               + b"}X\x05\x00\x00\x00dtypeX\x02\x00\x00\x00<f8sb.")
    with pytest.raises(CheckpointError):
        read_checkpoint(torch_like_zip(tmp_path / "evil.pt", payload))
    payload = (b"\x80\x02" + _global_bytes("torch", "FloatStorage")
               + b"N}X\x05\x00\x00\x00dtypeX\x02\x00\x00\x00<f8s\x86b.")
    with pytest.raises(CheckpointError):
        read_checkpoint(torch_like_zip(tmp_path / "evil2.pt", payload))
    sd, _ = read_checkpoint(CK / "tensors.pt")  # still reads float32 as float32
    assert sd["fp32"].dtype == mx.float32


def test_bare_pickle_not_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"w": _Shell(f"touch {marker}")}, protocol=2))
    with pytest.raises(CheckpointError, match="bare pickle"):
        read_checkpoint(path)
    assert not marker.exists()


def test_legacy_format_refused_with_hint():
    with pytest.raises(CheckpointError, match=r"legacy .*torch\.save\(torch\.load"):
        read_checkpoint(CK / "legacy.pt")


def test_not_a_state_dict(tmp_path):
    path = torch_like_zip(tmp_path / "list.pt", pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(CheckpointError, match="no state dict found"):
        read_checkpoint(path)


def test_zip_without_pickle(tmp_path):
    path = tmp_path / "x.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("hello.txt", "hi")
    with pytest.raises(CheckpointError, match="not a torch.save checkpoint"):
        read_checkpoint(path)


def test_truncated_and_corrupt(tmp_path):
    data = (CK / "mac_tiny.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_checkpoint(tmp_path / "cut.pt")
    # flip bytes inside a storage: the zip's CRC catches it
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = next(i for i in zf.infolist() if "/data/" in i.filename and i.file_size > 64)
    head = info.header_offset
    name_len, extra_len = (int.from_bytes(data[head + i : head + i + 2], "little") for i in (26, 28))
    start = head + 30 + name_len + extra_len  # torch pads the local header's extra field for alignment
    bad = bytearray(data)
    bad[start + 8 : start + 16] = b"\xff" * 8
    (tmp_path / "flip.pt").write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match="corrupt"):
        read_checkpoint(tmp_path / "flip.pt")


def test_missing_and_junk(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        read_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.bin").write_bytes(b"just some text, not weights\n" * 4)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        read_checkpoint(tmp_path / "junk.bin")
    with pytest.raises(CheckpointError, match="directory"):
        read_checkpoint(tmp_path)
    st = tmp_path / "cut.safetensors"
    mx.save_safetensors(str(st), {"a": mx.zeros((64, 64))})
    st.write_bytes(st.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="safetensors"):
        read_checkpoint(st)
