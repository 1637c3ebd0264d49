"""hfread: read a Hugging Face checkpoint folder (config.json + safetensors or PyTorch .bin, sharded or not)
with numpy only, independently of kiln and of fixtures/torchsave.py.

`read_folder(path)` returns (config dict, tensors) where tensors is a list of (name, dtype, array) in the
order llama.cpp's convert_hf_to_gguf reads them: part files sorted by file name (taken from the index's
weight_map values when an index exists), keys of a safetensors part sorted by name (safe_open().keys()),
keys of a .bin part in pickle (dict insertion) order. dtype is "F16", "F32", "BF16", ...; BF16 arrays are
returned as their uint16 bit patterns.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import struct
import zipfile

import numpy as np

ST_DTYPES = {
    "F16": np.float16, "F32": np.float32, "F64": np.float64, "BF16": np.uint16,
    "I8": np.int8, "U8": np.uint8, "I16": np.int16, "I32": np.int32, "I64": np.int64, "BOOL": np.bool_,
}
TORCH_STORAGES = {
    "HalfStorage": ("F16", np.float16), "FloatStorage": ("F32", np.float32),
    "DoubleStorage": ("F64", np.float64), "BFloat16Storage": ("BF16", np.uint16),
    "CharStorage": ("I8", np.int8), "ByteStorage": ("U8", np.uint8), "ShortStorage": ("I16", np.int16),
    "IntStorage": ("I32", np.int32), "LongStorage": ("I64", np.int64), "BoolStorage": ("BOOL", np.bool_),
}


def read_safetensors(path: str) -> list[tuple[str, str, np.ndarray]]:
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack_from("<Q", raw, 0)
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    out = []
    for name in sorted(k for k in header if k != "__metadata__"):
        info = header[name]
        dt = info["dtype"]
        b, e = info["data_offsets"]
        arr = np.frombuffer(raw[base + b : base + e], dtype=np.dtype(ST_DTYPES[dt]).newbyteorder("<"))
        out.append((name, dt, arr.reshape(info["shape"]).astype(ST_DTYPES[dt])))
    return out


class _StorageType:
    def __init__(self, name: str):
        self.name = name


class _Rebuilt:
    """Placeholder produced by _rebuild_tensor_v2 during unpickling."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return _Rebuilt(storage, storage_offset, size, stride)


def read_torch_bin(path: str) -> list[tuple[str, str, np.ndarray]]:
    zf = zipfile.ZipFile(path)
    names = zf.namelist()
    pkl_name = next(n for n in names if n.endswith("/data.pkl") or n == "data.pkl")
    prefix = pkl_name[: -len("data.pkl")]
    storages: dict[str, tuple[str, np.ndarray]] = {}

    class U(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return _rebuild_tensor_v2
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            if module == "torch" and name in TORCH_STORAGES:
                return _StorageType(name)
            raise pickle.UnpicklingError(f"unexpected global {module}.{name}")

        def persistent_load(self, pid):
            kind, stype, key, _loc, numel = pid
            if kind != "storage":
                raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
            if key not in storages:
                dt, npdt = TORCH_STORAGES[stype.name]
                data = zf.read(f"{prefix}data/{key}")
                arr = np.frombuffer(data, dtype=np.dtype(npdt).newbyteorder("<")).astype(npdt)
                if arr.size != numel:
                    raise ValueError(f"storage {key}: {arr.size} elements, pickle says {numel}")
                storages[key] = (dt, arr)
            return storages[key]

    obj = U(zf.open(pkl_name)).load()
    out = []
    for name, t in obj.items():
        dt, arr = t.storage
        item = arr.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            arr[t.offset :], shape=t.size, strides=tuple(s * item for s in t.stride), writeable=False
        )
        out.append((name, dt, np.array(view)))
    return out


def part_files(folder: str) -> tuple[str, list[str]]:
    """('safetensors' | 'bin', sorted part file names) as convert_hf_to_gguf picks them."""
    files = os.listdir(folder)
    st = sorted(f for f in files if f.startswith("model") and f.endswith(".safetensors"))
    is_st = bool(st) or os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
    kind = "safetensors" if is_st else "bin"
    parts = st if is_st else sorted(f for f in files if f.startswith("pytorch_model") and f.endswith(".bin"))
    index = os.path.join(folder, "model.safetensors.index.json" if is_st else "pytorch_model.bin.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            wm = json.load(f)["weight_map"]
        parts = sorted(dict.fromkeys(wm.values()))
    return kind, parts


def read_folder(folder: str):
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    kind, parts = part_files(folder)
    tensors = []
    for p in parts:
        full = os.path.join(folder, p)
        tensors.extend(read_safetensors(full) if kind == "safetensors" else read_torch_bin(full))
    return config, tensors
