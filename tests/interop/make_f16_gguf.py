#!/usr/bin/env python3
"""make_f16_gguf: write a synthetic Llama GGUF (F16 matrices, F32 norms) for quantize tests and benchmarks.

Usage: make_f16_gguf.py OUT.gguf --preset tiny|400m|3b|7b [--vocab-from TOKENIZER.model] [--seed N]
                        [--shared DIR]

Metadata is what convert_hf_to_gguf writes for a Llama-2 style model with --outtype f16 (§1.4), with the
real vocabulary (tokens, scores, types) from a SentencePiece tokenizer.model: by default the
Chinese-LLaMA-2 one for vocab 55296 and the Llama-2 one for 32000, found in the shared fixtures.
Tensors are in the order convert_hf_to_gguf writes a single model.safetensors (HF names sorted).
Weights: matrices ~ normal(0, 0.02) in f16, norms 1 + normal(0, 0.1) in f32. To stay fast and small in
memory for the 13 GB 7b preset, matrices are cut from a fixed pool of 2^24+1 random f16 values at random
offsets, one chunk of rows at a time, and written straight to the file (peak memory ~ 200 MB).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import gguf
from gguf import GGMLQuantizationType as QT

PRESETS = {
    # name: hidden, layers, heads, kv heads, ffn, vocab, context
    "tiny": dict(hidden=256, layers=2, heads=8, kv=2, ffn=768, vocab=55296, ctx=512),
    "400m": dict(hidden=2048, layers=4, heads=16, kv=16, ffn=5504, vocab=55296, ctx=4096),
    "3b": dict(hidden=3200, layers=26, heads=32, kv=32, ffn=8640, vocab=32000, ctx=2048),
    "7b": dict(hidden=4096, layers=32, heads=32, kv=32, ffn=11008, vocab=55296, ctx=4096),
}
POOL = (1 << 24) + 1
CHUNK = 1 << 24  # elements per write


def find_shared(start: str) -> str | None:
    d = os.path.abspath(start)
    while True:
        cand = os.path.join(d, "shared")
        if os.path.isfile(os.path.join(cand, "spec", "llamacpp.md")):
            return cand
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent


def tensor_list(p: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    """(HF name, GGUF name, numpy shape), sorted by HF name as convert_hf_to_gguf reads one safetensors file."""
    h, ff, v = p["hidden"], p["ffn"], p["vocab"]
    hd = h // p["heads"]
    out = [
        ("model.embed_tokens.weight", "token_embd.weight", (v, h)),
        ("model.norm.weight", "output_norm.weight", (h,)),
        ("lm_head.weight", "output.weight", (v, h)),
    ]
    for i in range(p["layers"]):
        hp, gp = f"model.layers.{i}.", f"blk.{i}."
        out += [
            (hp + "input_layernorm.weight", gp + "attn_norm.weight", (h,)),
            (hp + "self_attn.q_proj.weight", gp + "attn_q.weight", (p["heads"] * hd, h)),
            (hp + "self_attn.k_proj.weight", gp + "attn_k.weight", (p["kv"] * hd, h)),
            (hp + "self_attn.v_proj.weight", gp + "attn_v.weight", (p["kv"] * hd, h)),
            (hp + "self_attn.o_proj.weight", gp + "attn_output.weight", (h, p["heads"] * hd)),
            (hp + "post_attention_layernorm.weight", gp + "ffn_norm.weight", (h,)),
            (hp + "mlp.gate_proj.weight", gp + "ffn_gate.weight", (ff, h)),
            (hp + "mlp.up_proj.weight", gp + "ffn_up.weight", (ff, h)),
            (hp + "mlp.down_proj.weight", gp + "ffn_down.weight", (h, ff)),
        ]
    out.sort(key=lambda t: t[0])
    return out


def vocab(path: str, n_vocab: int):
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(path)
    tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [5] * n_vocab
    for i in range(min(n_vocab, sp.vocab_size())):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = 2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 5 if sp.IsUnused(i) else 6 if sp.IsByte(i) else 1
    return tokens, scores, types


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--vocab-from", help="tokenizer.model (default: from the shared fixtures by vocab size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shared", default=os.environ.get("KILN_SHARED") or find_shared(os.path.dirname(__file__)))
    args = ap.parse_args()
    p = PRESETS[args.preset]
    tok = args.vocab_from
    if tok is None:
        sub = "chinese-llama-2-tokenizer" if p["vocab"] == 55296 else "llama-2-tokenizer"
        tok = os.path.join(args.shared or "", "fixtures", sub, "tokenizer.model")
    if not os.path.isfile(tok):
        print(f"error: tokenizer model {tok!r} not found; pass --vocab-from", file=sys.stderr)
        return 2

    t0 = time.time()
    rng = np.random.default_rng(args.seed)
    pool = (rng.standard_normal(POOL, dtype=np.float32) * np.float32(0.02)).astype(np.float16)
    tensors = tensor_list(p)

    w = gguf.GGUFWriter(args.out, "llama")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(f"kiln synthetic {args.preset}")
    w.add_block_count(p["layers"])
    w.add_context_length(p["ctx"])
    w.add_embedding_length(p["hidden"])
    w.add_feed_forward_length(p["ffn"])
    w.add_head_count(p["heads"])
    w.add_head_count_kv(p["kv"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_vocab_size(p["vocab"])
    w.add_rope_dimension_count(p["hidden"] // p["heads"])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, scores, types = vocab(tok, p["vocab"])
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    for _, name, shape in tensors:
        is_norm = len(shape) == 1
        dt = np.dtype(np.float32) if is_norm else np.dtype(np.float16)
        n = int(np.prod(shape))
        w.add_tensor_info(name, shape, dt, n * dt.itemsize, raw_dtype=QT.F32 if is_norm else QT.F16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    # stream the data ourselves: same layout as GGUFWriter.write_tensor_data (pad to alignment before
    # the first tensor and after each one), but chunk by chunk
    fout = w.fout[0]
    align = w.data_alignment
    fout.write(b"\0" * ((-fout.tell()) % align))
    total = 0
    for _, name, shape in tensors:
        n = int(np.prod(shape))
        if len(shape) == 1:
            data = (np.float32(1.0) + rng.standard_normal(n, dtype=np.float32) * np.float32(0.1)).astype("<f4")
            data.tofile(fout)
        else:
            left = n
            while left > 0:
                k = min(CHUNK, left)
                s = int(rng.integers(0, POOL - k + 1))
                pool[s : s + k].tofile(fout)
                left -= k
        nbytes = n * (4 if len(shape) == 1 else 2)
        total += nbytes
        fout.write(b"\0" * ((-nbytes) % align))
    w.close()
    print(f"{args.out}: preset {args.preset}, {len(tensors)} tensors, {total / 1e9:.2f} GB of data, "
          f"vocab {p['vocab']} from {tok}, {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
