"""check_torchsave: proves fixtures/torchsave.py writes exactly what torch.save writes.

Reads the real torch.save file shared/fixtures/torch-save-llama/pytorch_model.bin with hfread (zipfile +
pickle, no torch), re-writes the same state dict with torchsave (same archive name and serialization id)
and requires the two files to be byte-identical. Also round-trips OrderedDict, BF16, 1-D and strided-view
tensors through writer and reader. Usage: check_torchsave.py [--shared DIR]; exit 0 when all is well.
"""

import argparse
import os
import sys
import tempfile
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "..", "fixtures")]
import hfread  # noqa: E402
import torchsave  # noqa: E402


def find_shared(start):
    d = os.path.abspath(start)
    while True:
        cand = os.path.join(d, "shared")
        if os.path.isfile(os.path.join(cand, "spec", "llamacpp.md")):
            return cand
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=os.environ.get("KILN_SHARED") or find_shared(HERE))
    args = ap.parse_args()
    fails = 0
    real_path = os.path.join(args.shared or "", "fixtures", "torch-save-llama", "pytorch_model.bin")
    if os.path.isfile(real_path):
        real = open(real_path, "rb").read()
        sid = zipfile.ZipFile(real_path).read("pytorch_model/.data/serialization_id").decode()
        sd = {n: (torchsave.BF16(a) if dt == "BF16" else a) for n, dt, a in hfread.read_torch_bin(real_path)}
        mine = torchsave.save_bytes(sd, "pytorch_model", ordered=False, serialization_id=sid)
        same = mine == real
        print(f"real torch.save file ({len(sd)} tensors, {len(real)} bytes): {'identical' if same else 'DIFFERENT'}")
        fails += not same
    elif os.environ.get("KILN_REQUIRE_INTEROP") == "1":
        print("KILN_REQUIRE_INTEROP=1 but the shared torch-save-llama fixture is missing (../shared or KILN_SHARED)")
        fails += 1
    else:
        print("SKIPPED byte comparison: shared torch-save-llama fixture not found (../shared or KILN_SHARED)")

    rng = np.random.default_rng(7)
    base = rng.standard_normal(64).astype(np.float32)
    sd = {
        "a": rng.standard_normal((3, 5)).astype(np.float16),
        "b": torchsave.BF16.from_f32(rng.standard_normal((4, 2)).astype(np.float32)),
        "c": np.arange(7, dtype=np.int64),
        "v1": torchsave.View(base, 8, (4, 3), (1, 4)),  # transposed view
        "v2": torchsave.View(base, 0, (2, 2), (2, 1)),  # same storage
    }
    with tempfile.TemporaryDirectory() as td:
        p = os.path.join(td, "adapter_model.bin")
        torchsave.save(sd, p, ordered=True)
        names = zipfile.ZipFile(p).namelist()
        got = {n: (dt, a) for n, dt, a in hfread.read_torch_bin(p)}
    exp_v1 = np.lib.stride_tricks.as_strided(base[8:], (4, 3), (4, 16))
    checks = [
        names[0] == "adapter_model/data.pkl" and "adapter_model/data/1" in names and "adapter_model/data/4" not in names,
        got["a"][0] == "F16" and np.array_equal(got["a"][1], sd["a"]),
        got["b"][0] == "BF16" and np.array_equal(got["b"][1], sd["b"].bits),
        got["c"][0] == "I64" and np.array_equal(got["c"][1], sd["c"]),
        np.array_equal(got["v1"][1], exp_v1),
        np.array_equal(got["v2"][1], base[:4].reshape(2, 2)),
    ]
    print(f"round trip: {sum(checks)}/{len(checks)} checks pass")
    fails += len(checks) - sum(checks)
    print("OK" if fails == 0 else f"FAIL {fails}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
