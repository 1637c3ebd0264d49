#!/usr/bin/env python3
"""compare_gguf: compare two GGUF files' tensors (type, ne, sha256 of data) and metadata (type and value).

Usage: compare_gguf.py A.gguf B.gguf [--ignore-key KEY ...] [--check-order] [--quiet]

Tensors are matched by name (order-insensitive unless --check-order). For a tensor whose bytes differ the
report names the first differing block (index in the tensor, and row / block-in-row) and both types; a
type or shape difference is reported as such. Metadata keys are compared by value type and raw value bytes
(floats bit-exactly); KEY may be a glob (e.g. 'general.*'). Key order is reported with --check-order.
Used to compare `kiln quantize` with `llama-quantize`. Exit 1 on any mismatch, 0 when equal.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import os
import sys

import numpy as np

import gguf
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT


def tname(t: int) -> str:
    try:
        return QT(t).name
    except ValueError:
        return f"type{t}"


def raw_value(f) -> tuple[tuple[int, ...], bytes]:
    """(value types, raw bytes of the value) of a field: everything after the key."""
    return tuple(int(t) for t in f.types), b"".join(np.asarray(p).tobytes() for p in f.parts[2:])


def show_value(f) -> str:
    try:
        t = f.types[0]
        if t == VT.ARRAY:
            n = len(f.data)
            head = [f.contents(i) for i in range(min(3, n))]
            return f"[{n} items: {', '.join(repr(x) for x in head)}{', ...' if n > 3 else ''}]"
        v = f.contents()
        return repr(v if not isinstance(v, str) or len(v) < 80 else v[:77] + "...")
    except Exception:  # display only
        return "<unprintable>"


def tensor_bytes(t) -> bytes:
    return np.ascontiguousarray(t.data).reshape(-1).view(np.uint8).tobytes()


def first_diff(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    step = 1 << 16
    for s in range(0, n, step):
        if a[s : s + step] != b[s : s + step]:
            return s + next(i for i in range(min(step, n - s)) if a[s + i] != b[s + i])
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--ignore-key", action="append", default=[], metavar="KEY", help="glob; repeatable")
    ap.add_argument("--check-order", action="store_true", help="also require the same tensor and key order")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()

    for path in (args.a, args.b):
        if not os.path.isfile(path):
            print(f"error: {path} not found")
            return 2
    ra, rb = gguf.GGUFReader(args.a), gguf.GGUFReader(args.b)
    errors: list[str] = []

    def ignored(k: str) -> bool:
        return k.startswith("GGUF.") or any(fnmatch.fnmatchcase(k, g) for g in args.ignore_key)

    # metadata
    fa = {k: f for k, f in ra.fields.items() if not ignored(k)}
    fb = {k: f for k, f in rb.fields.items() if not ignored(k)}
    for k in fa:
        if k not in fb:
            errors.append(f"key {k}: only in A ({show_value(fa[k])})")
    for k in fb:
        if k not in fa:
            errors.append(f"key {k}: only in B ({show_value(fb[k])})")
    for k in fa:
        if k in fb:
            (ta, va), (tb, vb) = raw_value(fa[k]), raw_value(fb[k])
            if ta != tb:
                errors.append(f"key {k}: value type {ta} in A, {tb} in B")
            elif va != vb:
                errors.append(f"key {k}: A={show_value(fa[k])} B={show_value(fb[k])}")
    if args.check_order:
        oa = [k for k in fa if k in fb]
        ob = [k for k in fb if k in fa]
        if oa != ob:
            i = next(i for i, (x, y) in enumerate(zip(oa, ob)) if x != y)
            errors.append(f"key order: position {i} is {oa[i]} in A, {ob[i]} in B")

    # tensors
    ta = {t.name: t for t in ra.tensors}
    tb = {t.name: t for t in rb.tensors}
    for n in ta:
        if n not in tb:
            errors.append(f"tensor {n}: only in A ({tname(ta[n].tensor_type)})")
    for n in tb:
        if n not in ta:
            errors.append(f"tensor {n}: only in B ({tname(tb[n].tensor_type)})")
    same = 0
    for n, x in ta.items():
        y = tb.get(n)
        if y is None:
            continue
        xt, yt = int(x.tensor_type), int(y.tensor_type)
        xs, ys = [int(v) for v in x.shape], [int(v) for v in y.shape]
        if xt != yt:
            errors.append(f"tensor {n}: type {tname(xt)} in A, {tname(yt)} in B (ne {xs})")
            continue
        if xs != ys:
            errors.append(f"tensor {n}: ne {xs} in A, {ys} in B ({tname(xt)})")
            continue
        da, db = tensor_bytes(x), tensor_bytes(y)
        if hashlib.sha256(da).digest() != hashlib.sha256(db).digest():
            blk, tsz = gguf.GGML_QUANT_SIZES[QT(xt)]
            at = first_diff(da, db)
            block = at // tsz
            per_row = xs[0] // blk
            ndiff = sum(1 for i in range(0, len(da), tsz) if da[i : i + tsz] != db[i : i + tsz]) if len(da) <= 1 << 26 else -1
            count = f", {ndiff} of {len(da) // tsz} blocks differ" if ndiff >= 0 else ""
            errors.append(
                f"tensor {n}: data differs ({tname(xt)} in A, {tname(yt)} in B): first at block {block} "
                f"(row {block // per_row}, block {block % per_row} of the row, byte {at}){count}"
            )
            continue
        same += 1
    if args.check_order:
        oa = [t.name for t in ra.tensors if t.name in tb]
        ob = [t.name for t in rb.tensors if t.name in ta]
        if oa != ob:
            i = next(i for i, (x, y) in enumerate(zip(oa, ob)) if x != y)
            errors.append(f"tensor order: position {i} is {oa[i]} in A, {ob[i]} in B")

    for e in errors:
        print(e)
    if errors:
        print(f"FAIL {len(errors)} mismatches ({same} of {len(ta)} tensors equal)")
        return 1
    print(f"OK {len(ta)} tensors, {len(fa)} keys equal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
