#!/usr/bin/env python3
"""Writes a Hugging Face Llama directory with random weights of the default model's shapes
(SmolLM2-135M-Instruct: 30 layers, hidden 576, GQA 9/3; the head untied, see CONFIG) and the default
model's tokenizer, for the GPU check (recipes/gpu/check.sh) on a machine that cannot download
the model. Needs numpy (or PyTorch); writes safetensors by hand (no safetensors package).

    python3 recipes/gpu/random_model.py --tokenizer-dir KIT --out DIR [--seed 0]
"""
import argparse
import json
import os
import shutil
import struct

import numpy as np

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "max_position_embeddings": 8192,
    # Untied: with tied random embeddings each position's largest logit is its own token (the
    # residual stream keeps its embedding), and greedy decoding repeats the prompt's last token.
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def tensors(rng):
    c = CONFIG
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    # Scaled so that neither the embedding nor one layer swamps the residual stream: with all
    # weights at 0.02 the states collapse and every position predicts the same token, which
    # would make a greedy equality check say nothing.
    def normal(*shape, std=None):
        std = std if std is not None else 0.5 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)
    ones = lambda n: np.ones(n, dtype=np.float32)
    yield "model.embed_tokens.weight", normal(v, h, std=1.0)
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        yield p + "input_layernorm.weight", ones(h)
        yield p + "self_attn.q_proj.weight", normal(h, h)
        yield p + "self_attn.k_proj.weight", normal(kv, h)
        yield p + "self_attn.v_proj.weight", normal(kv, h)
        yield p + "self_attn.o_proj.weight", normal(h, h)
        yield p + "post_attention_layernorm.weight", ones(h)
        yield p + "mlp.gate_proj.weight", normal(i, h)
        yield p + "mlp.up_proj.weight", normal(i, h)
        yield p + "mlp.down_proj.weight", normal(h, i)
    yield "model.norm.weight", ones(h)
    yield "lm_head.weight", normal(v, h, std=1.0)


def write_safetensors(path, named):
    header, offset, blobs = {}, 0, []
    for name, t in named:
        data = np.ascontiguousarray(t).tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer-dir", required=True, help="holds tokenizer.json and tokenizer_config.json")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(a.tokenizer_dir, f), os.path.join(a.out, f))
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)
    write_safetensors(os.path.join(a.out, "model.safetensors"), tensors(np.random.default_rng(a.seed)))
    print(f"random model of the default shapes in {a.out}")


if __name__ == "__main__":
    main()
