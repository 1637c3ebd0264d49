#!/usr/bin/env python3
"""PyTorch zip checkpoints without torch: test helper for kiln-formats (src/torch.rs tests).

  torch_bin.py write OUT.bin   writes a torch.save-compatible state dict (F32, F16, BF16 tensors,
                               a shared storage with an offset) using only zipfile + pickle, and prints
                               {name: {dtype, shape, values (f32 bit patterns)}} as JSON.
  torch_bin.py read IN.bin     an independent restricted reader (zipfile + pickle.Unpickler with an
                               allow-listed find_class + numpy); prints {name: {shape, head, tail (f32 bits), sum,
                               byte_sum}} as JSON. Exits 77 when numpy is missing.
"""
import collections
import json
import pickle
import struct
import sys
import types
import zipfile


# ---------------------------------------------------------------- writing (no torch, no numpy)

def _fake_torch():
    """Fake `torch` / `torch._utils` modules so pickle emits GLOBAL 'torch HalfStorage' etc."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")
    torch._utils = utils

    def _rebuild_tensor_v2(*args):  # never called: only its name is pickled
        raise RuntimeError("placeholder")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    storage_types = {}
    for name in ("FloatStorage", "HalfStorage", "BFloat16Storage"):
        cls = type(name, (), {"__module__": "torch"})
        setattr(torch, name, cls)
        storage_types[name] = cls
    sys.modules.setdefault("torch", torch)
    sys.modules.setdefault("torch._utils", utils)
    return _rebuild_tensor_v2, storage_types


class Storage:
    def __init__(self, key, storage_type, numel):
        self.key, self.storage_type, self.numel = key, storage_type, numel


class Tensor:
    def __init__(self, rebuild, storage, offset, shape):
        self.rebuild, self.storage, self.offset, self.shape = rebuild, storage, offset, tuple(shape)

    def __reduce__(self):
        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.insert(0, acc)
            acc *= d
        return (self.rebuild,
                (self.storage, self.offset, self.shape, tuple(stride), False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def encode(dtype, values):
    if dtype == "F32":
        return struct.pack("<%df" % len(values), *values)
    if dtype == "F16":
        return struct.pack("<%de" % len(values), *values)
    if dtype == "BF16":  # top half of the f32 bits (values here are exactly representable)
        return b"".join(struct.pack("<I", struct.unpack("<I", struct.pack("<f", v))[0])[2:] for v in values)
    raise ValueError(dtype)


def decode(dtype, raw):
    """The exact values a reader sees (f32 rounding of 0.1 etc.)."""
    if dtype == "F32":
        return list(struct.unpack("<%df" % (len(raw) // 4), raw))
    if dtype == "F16":
        return list(struct.unpack("<%de" % (len(raw) // 2), raw))
    return [struct.unpack("<f", b"\0\0" + raw[i:i + 2])[0] for i in range(0, len(raw), 2)]


def f32_bits(values):
    """f32 bit patterns of the values (JSON floats may not round-trip exactly)."""
    return [struct.unpack("<I", struct.pack("<f", v))[0] for v in values]


def write(path):
    rebuild, st = _fake_torch()
    kind = {"F32": st["FloatStorage"], "F16": st["HalfStorage"], "BF16": st["BFloat16Storage"]}
    state = collections.OrderedDict()
    blobs, expected = {}, {}

    def add(name, dtype, shape, values, key=None, offset=0, storage_values=None):
        key = key if key is not None else str(len(blobs))
        data = storage_values if storage_values is not None else values
        if key not in blobs:
            blobs[key] = (dtype, data)
        storage = Storage(key, kind[dtype], len(blobs[key][1]))
        state[name] = Tensor(rebuild, storage, offset, shape)
        expected[name] = {"dtype": dtype, "shape": list(shape), "values": f32_bits(decode(dtype, encode(dtype, values)))}

    add("model.embed_tokens.weight", "F16", [3, 2], [0.5, -1.0, 2.0, 0.25, -0.125, 65504.0])
    add("model.norm.weight", "F32", [4], [1.0, 0.1, -3.5, 1e-7])
    add("lm_head.weight", "BF16", [2, 2], [1.0, -2.0, 0.375, 3221225472.0])
    # Two tensors sharing storage "9": the second starts 2 elements in.
    shared = [10.0, 20.0, 30.0, 40.0, 50.0]
    add("a.bias", "F32", [2], shared[:2], key="9", storage_values=shared)
    add("b.bias", "F32", [3], shared[2:], key="9", offset=2, storage_values=shared)

    # The pickle's storages are shared objects so memoisation matches torch's output.
    seen = {}
    for t in state.values():
        seen.setdefault(t.storage.key, t.storage)
        t.storage = seen[t.storage.key]

    prefix = "archive"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        import io
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(state)
        z.writestr(prefix + "/data.pkl", buf.getvalue())
        z.writestr(prefix + "/byteorder", "little")
        for key, (dtype, vals) in blobs.items():
            z.writestr(prefix + "/data/" + key, encode(dtype, vals))
        z.writestr(prefix + "/version", "3\n")
    json.dump(expected, sys.stdout)


# ---------------------------------------------------------------- reading (independent check)

def read(path):
    try:
        import numpy as np
    except ImportError:
        sys.stderr.write("numpy not installed")
        sys.exit(77)
    z = zipfile.ZipFile(path)
    pkl = [n for n in z.namelist() if n.endswith("/data.pkl")][0]
    prefix = pkl[: -len("data.pkl")]
    dtypes = {"HalfStorage": (np.float16, 2), "FloatStorage": (np.float32, 4), "BFloat16Storage": ("bf16", 2)}

    class StorageType:
        def __init__(self, name):
            self.name = name

    def rebuild(storage, offset, size, stride, *rest):
        (dt, esize), raw = storage
        n = int(np.prod(size)) if size else 1
        chunk = raw[offset * esize: (offset + n) * esize]
        if dt == "bf16":
            vals = (np.frombuffer(chunk, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            vals = np.frombuffer(chunk, dtype=dt)
        return vals.astype(np.float64).reshape(size), chunk

    class Reader(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return rebuild
            if module == "torch" and name in dtypes:
                return StorageType(name)
            raise pickle.UnpicklingError("forbidden global %s.%s" % (module, name))

        def persistent_load(self, pid):
            _, st, key, _, _ = pid
            return (dtypes[st.name], z.read(prefix + "data/" + key))

    state = Reader(z.open(pkl)).load()
    out = {}
    for name, (arr, chunk) in state.items():
        flat = arr.ravel()
        out[name] = {
            "shape": list(arr.shape),
            # f32 bit patterns (exact; JSON float parsing may be off by an ulp)
            "head": flat[:8].astype(np.float32).view(np.uint32).tolist(),
            "tail": flat[-8:].astype(np.float32).view(np.uint32).tolist(),
            "sum": float(flat.sum()),
            "byte_sum": int(sum(chunk)),
        }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    {"write": write, "read": read}[sys.argv[1]](sys.argv[2])
