#!/usr/bin/env python3
"""expected_gguf: independent check that OUT_GGUF is what llama.cpp's convert_hf_to_gguf.py writes for HF_DIR.

Usage: expected_gguf.py HF_DIR OUT_GGUF --outtype f16|f32|bf16|q8_0 [--ignore-order] [--quiet]

Reads the HF Llama folder with numpy (tests/interop/hfread.py: safetensors or torch .bin, sharded or not),
applies the conversion rules of shared/spec/llamacpp.md §1.4 and §2 itself (name mapping, Q/K row
permutation with n_head / n_head_kv, 1-D and *_norm.weight tensors to F32, other dtypes via f32, f16 by
numpy RNE, bf16 by RNE on the top 16 bits, q8_0 by gguf.quants.quantize), builds the vocabulary with the
sentencepiece package (placeholders [PAD{i}], added_tokens.json, added_tokens_decoder, special ids and
add_bos/add_eos as gguf.SpecialVocab derives them), then reads OUT_GGUF with gguf.GGUFReader and compares
every tensor (name set, type, ne, bytes, order) and every metadata key (type and value; general.* keys
other than architecture/type/file_type/quantization_version are free-form and only listed).
Prints each mismatch; exit 1 on any, 0 when all equal (last line `OK <n> tensors, <k> keys`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hfread  # noqa: E402

import gguf  # noqa: E402
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf import GGUFValueType as VT  # noqa: E402

OUTTYPES = {"f32": (QT.F32, 0), "f16": (QT.F16, 1), "bf16": (QT.BF16, 32), "q8_0": (QT.Q8_0, 7)}
LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_MAP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
DROP_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")
# token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def gguf_name(hf: str) -> str:
    if hf in TOP_MAP:
        return TOP_MAP[hf]
    parts = hf.split(".")
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdecimal():
        rest = ".".join(parts[3:])
        if rest in LAYER_MAP:
            return f"blk.{int(parts[2])}.{LAYER_MAP[rest]}"
    raise KeyError(f"no GGUF name for HF tensor {hf!r}")


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp adjacent pairs: gguf_row[h*hd+2j+k] = hf_row[h*hd+k*half+j]."""
    rows = w.shape[0]
    hd = rows // n_head
    half = hd // 2
    idx = np.empty(rows, dtype=np.int64)
    for h in range(n_head):
        for j in range(half):
            for k in range(2):
                idx[h * hd + 2 * j + k] = h * hd + k * half + j
    return w[idx]


def bf16_bytes(x32: np.ndarray) -> bytes:
    u = np.ascontiguousarray(x32, dtype=np.float32).view(np.uint32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    r = np.where(nan, (u >> 16) | 64, r)
    return r.astype("<u2").tobytes()


def expected_tensors(config: dict, tensors, outtype: str):
    """[(gguf name, ggml type, ne list, bytes)] in file order."""
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_head)
    out_q = OUTTYPES[outtype][0]
    res = []
    for name, dt, arr in tensors:
        if name.endswith(DROP_SUFFIXES):
            continue
        if dt == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        elif dt not in ("F16", "F32"):
            arr = arr.astype(np.float32)
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            arr = permute(arr, n_head)
        if name.endswith(("k_proj.weight", "k_proj.bias")):
            arr = permute(arr, n_kv)
        new = gguf_name(name)
        if arr.ndim <= 1 or new.endswith("_norm.weight") or not new.endswith(".weight"):
            q = QT.F32
        else:
            q = out_q
        if q == QT.F32:
            data = arr.astype("<f4").tobytes()
        elif q == QT.F16:
            data = arr.astype("<f2").tobytes()
        elif q == QT.BF16:
            data = bf16_bytes(arr.astype(np.float32))
        else:
            data = np.ascontiguousarray(gguf.quants.quantize(arr, q)).tobytes()
        res.append((new, q, [int(n) for n in reversed(arr.shape)], data))
    return res


def _json(path: str):
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return None


def looks_special(t: str) -> bool:
    return (t in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (t.startswith("<|") and t.endswith("|>"))
            or (t.startswith("<\uff5c") and t.endswith("\uff5c>")) or (t.startswith("<unused") and t.endswith(">")))


def expected_vocab(folder: str, config: dict):
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(os.path.join(folder, "tokenizer.model"))
    vocab_size = config.get("vocab_size") or sp.vocab_size()
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = (UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else UNUSED if sp.IsUnused(i)
                    else BYTE if sp.IsByte(i) else NORMAL)
    for text, i in (_json(os.path.join(folder, "added_tokens.json")) or {}).items():
        if i < vocab_size:
            tokens[i], scores[i], types[i] = text.encode(), -1000.0, USER_DEFINED
    tc = _json(os.path.join(folder, "tokenizer_config.json")) or {}
    for sid, data in tc.get("added_tokens_decoder", {}).items():
        i = int(sid)
        if i >= vocab_size:
            continue
        text = data["content"]
        if data.get("special") or looks_special(text):
            types[i] = CONTROL
        else:
            text = text.replace("\u2581", " ")
            types[i] = USER_DEFINED
        scores[i], tokens[i] = -1000.0, text.encode("utf-8")
    return tokens, scores, types, tc


def special_kvs(folder: str, n_vocab: int, tc: dict | None) -> list[tuple[str, int, object]]:
    """What gguf.SpecialVocab(folder, n_vocab).add_to_gguf writes, for folders without tokenizer.json."""
    kinds = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        class Collect:
            def __init__(self):
                self.kv = []

            def __getattr__(self, attr):
                if attr.startswith("add_add_") and attr.endswith("_token"):
                    key = f"tokenizer.ggml.add_{attr[8:-6]}_token"
                    return lambda v: self.kv.append((key, VT.BOOL, bool(v)))
                if attr.startswith("add_") and attr.endswith("_token_id"):
                    key = {"unk": "unknown", "pad": "padding", "sep": "seperator"}.get(attr[4:-9], attr[4:-9])
                    key = f"tokenizer.ggml.{key}_token_id"
                    return lambda v: self.kv.append((key, VT.UINT32, int(v)))
                if attr == "add_chat_template":
                    return lambda v: self.kv.append(("tokenizer.chat_template", VT.STRING, v))
                return lambda *a: None
        c = Collect()
        gguf.SpecialVocab(folder, n_vocab=n_vocab).add_to_gguf(c, quiet=True)
        print("note: tokenizer.json present; special tokens taken from gguf.SpecialVocab (pip gguf)")
        return c.kv
    ids: dict[str, int] = {}
    add: dict[str, bool] = {}
    chat = None
    if tc is not None:
        chat = tc.get("chat_template")
        for k in kinds:
            v = tc.get(f"add_{k}_token")
            if isinstance(v, bool):
                add[k] = v
            # *_token contents resolve only through tokenizer.json added_tokens, absent here
    config = _json(os.path.join(folder, "config.json")) or {}
    for k in kinds:
        tid = config.get(f"{k}_token_id")
        if isinstance(tid, int) and 0 <= tid < n_vocab and k not in ids:
            ids[k] = tid
    names = {"bos": "bos", "eos": "eos", "unk": "unknown", "sep": "seperator", "pad": "padding",
             "cls": "cls", "mask": "mask"}
    kv: list[tuple[str, int, object]] = [(f"tokenizer.ggml.{names[k]}_token_id", VT.UINT32, v) for k, v in ids.items()]
    kv += [(f"tokenizer.ggml.add_{k}_token", VT.BOOL, v) for k, v in add.items()]
    if isinstance(chat, str):
        kv.append(("tokenizer.chat_template", VT.STRING, chat))
    return kv


def expected_kvs(folder: str, config: dict, outtype: str) -> list[tuple[str, int, object]]:
    u32, f32 = VT.UINT32, VT.FLOAT32
    if config.get("rope_scaling") or (config.get("rope_parameters") or {}).get("rope_type", "default") != "default":
        print("note: rope scaling in config.json is not modelled by this checker")
    kv: list[tuple[str, int, object]] = [
        ("general.architecture", VT.STRING, "llama"),
        ("general.type", VT.STRING, "model"),
        ("llama.block_count", u32, config["num_hidden_layers"]),
        ("llama.context_length", u32, config["max_position_embeddings"]),
        ("llama.embedding_length", u32, config["hidden_size"]),
        ("llama.feed_forward_length", u32, config["intermediate_size"]),
        ("llama.attention.head_count", u32, config["num_attention_heads"]),
    ]
    if config.get("num_key_value_heads") is not None:
        kv.append(("llama.attention.head_count_kv", u32, config["num_key_value_heads"]))
    theta = config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta"))
    if theta is not None:
        kv.append(("llama.rope.freq_base", f32, theta))
    kv.append(("llama.attention.layer_norm_rms_epsilon", f32, config["rms_norm_eps"]))
    if config.get("head_dim") is not None:
        kv += [("llama.attention.key_length", u32, config["head_dim"]),
               ("llama.attention.value_length", u32, config["head_dim"])]
    kv.append(("general.file_type", u32, OUTTYPES[outtype][1]))
    kv.append(("llama.vocab_size", u32, config["vocab_size"]))
    rope_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv.append(("llama.rope.dimension_count", u32, rope_dim))
    kv.append(("general.quantization_version", u32, 2))
    tokens, scores, types, tc = expected_vocab(folder, config)
    if tc.get("add_prefix_space") is not None:
        kv.append(("tokenizer.ggml.add_space_prefix", VT.BOOL, bool(tc["add_prefix_space"])))
    kv += [
        ("tokenizer.ggml.model", VT.STRING, "llama"),
        ("tokenizer.ggml.pre", VT.STRING, "default"),
        ("tokenizer.ggml.tokens", (VT.ARRAY, VT.STRING), tokens),
        ("tokenizer.ggml.scores", (VT.ARRAY, VT.FLOAT32), scores),
        ("tokenizer.ggml.token_type", (VT.ARRAY, VT.INT32), types),
    ]
    has_tc = os.path.isfile(os.path.join(folder, "tokenizer_config.json"))
    kv += special_kvs(folder, len(tokens), tc if has_tc else None)
    return kv


def field_type(f):
    return (VT.ARRAY, f.types[-1]) if f.types[0] == VT.ARRAY else f.types[0]


def field_value(f):
    t = f.types[0]
    if t == VT.ARRAY:
        if f.types[-1] == VT.STRING:
            return [bytes(f.parts[i]) for i in f.data]
        return [f.parts[i][0] for i in f.data]
    if t == VT.STRING:
        return bytes(f.parts[f.data[0]])
    return f.parts[f.data[0]][0]


def same_value(vt, exp, got) -> bool:
    if vt == VT.STRING:
        return got == exp.encode("utf-8")
    if vt == (VT.ARRAY, VT.STRING):
        return got == exp
    if vt == (VT.ARRAY, VT.FLOAT32):
        return np.array_equal(np.asarray(got, dtype=np.float32).view(np.uint32),
                              np.asarray(exp, dtype=np.float32).view(np.uint32))
    if vt == (VT.ARRAY, VT.INT32):
        return [int(x) for x in got] == [int(x) for x in exp]
    if vt == VT.FLOAT32:
        return np.float32(got).view(np.uint32) == np.float32(exp).view(np.uint32)
    if vt == VT.BOOL:
        return bool(got) == bool(exp)
    return int(got) == int(exp)


def short(v) -> str:
    if isinstance(v, list):
        return f"[{len(v)} items: {', '.join(repr(x) for x in v[:3])}, ...]"
    return repr(v)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("hf_dir")
    ap.add_argument("out_gguf")
    ap.add_argument("--outtype", required=True, choices=sorted(OUTTYPES))
    ap.add_argument("--ignore-order", action="store_true", help="do not compare tensor and key order")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()

    for path, what in ((os.path.join(args.hf_dir, "config.json"), "HF folder config"), (args.out_gguf, "GGUF")):
        if not os.path.isfile(path):
            print(f"error: {what} {path} not found")
            return 2
    errors: list[str] = []
    config, tensors = hfread.read_folder(args.hf_dir)
    exp_t = expected_tensors(config, tensors, args.outtype)
    exp_kv = expected_kvs(args.hf_dir, config, args.outtype)
    reader = gguf.GGUFReader(args.out_gguf)

    # tensors
    got_t = {t.name: t for t in reader.tensors}
    exp_names = [e[0] for e in exp_t]
    for name in sorted(set(got_t) - set(exp_names)):
        errors.append(f"tensor {name}: unexpected in output")
    for name, q, ne, data in exp_t:
        t = got_t.get(name)
        if t is None:
            errors.append(f"tensor {name}: missing from output")
            continue
        if t.tensor_type != q:
            errors.append(f"tensor {name}: type {QT(t.tensor_type).name}, expected {q.name}")
            continue
        gne = [int(n) for n in t.shape]
        if gne != ne:
            errors.append(f"tensor {name}: ne {gne}, expected {ne}")
            continue
        gdata = np.ascontiguousarray(t.data).tobytes()
        if gdata != data:
            diff = next((i for i in range(min(len(gdata), len(data))) if gdata[i] != data[i]), min(len(gdata), len(data)))
            errors.append(f"tensor {name}: {len(gdata)} bytes differ from expected {len(data)} bytes, first at byte {diff}")
    got_order = [t.name for t in reader.tensors if t.name in set(exp_names)]
    if not args.ignore_order and set(got_t) == set(exp_names) and got_order != exp_names:
        i = next(i for i, (a, b) in enumerate(zip(got_order, exp_names)) if a != b)
        errors.append(f"tensor order: position {i} is {got_order[i]}, convert_hf_to_gguf writes {exp_names[i]}")

    # metadata
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    exp_keys = [k for k, _, _ in exp_kv]
    for key, vt, val in exp_kv:
        f = fields.get(key)
        if f is None:
            errors.append(f"key {key}: missing (expected {short(val)})")
            continue
        gvt = field_type(f)
        if gvt != vt:
            errors.append(f"key {key}: type {gvt}, expected {vt}")
            continue
        got = field_value(f)
        if not same_value(vt, val, got):
            if isinstance(val, list):
                n = len(got)
                if n != len(val):
                    errors.append(f"key {key}: {n} items, expected {len(val)}")
                else:
                    i = next(i for i in range(n) if not same_value(vt[1], val[i] if vt[1] != VT.STRING else val[i].decode("utf-8", "replace"), got[i]))
                    errors.append(f"key {key}: item {i} is {got[i]!r}, expected {val[i]!r}")
            else:
                errors.append(f"key {key}: value {got!r}, expected {val!r}")
    free = []
    for key in fields:
        if key not in exp_keys:
            if key.startswith("general."):
                free.append(f"{key}={short(field_value(fields[key]))}")
            else:
                errors.append(f"key {key}: unexpected in output")
    got_korder = [k for k in fields if k in set(exp_keys)]
    if not args.ignore_order and set(exp_keys) <= set(fields) and got_korder != exp_keys:
        i = next(i for i, (a, b) in enumerate(zip(got_korder, exp_keys)) if a != b)
        errors.append(f"key order: position {i} is {got_korder[i]}, convert_hf_to_gguf writes {exp_keys[i]}")
    if free and not args.quiet:
        print("free-form general keys (not compared): " + "; ".join(free))

    for e in errors:
        print(e)
    if errors:
        print(f"FAIL {len(errors)} mismatches ({len(exp_t)} tensors, {len(exp_kv)} keys expected)")
        return 1
    print(f"OK {len(exp_t)} tensors, {len(exp_kv)} keys")
    return 0


if __name__ == "__main__":
    sys.exit(main())
