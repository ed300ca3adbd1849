"""Build a tiny random-weight Llama, with a tokenizer trained on the spot, in Hugging Face format.

Run with the vLLM venv's python (it has torch, transformers and tokenizers); it imports nothing
from saber, so it can be run by file path:

    .venv-vllm/bin/python bench/saber_bench/tiny_model.py OUT_DIR

No hub access exists on the test machines, so the tokenizer is a byte-level BPE trained on
Python sources from the standard library (code prompts then tokenize like code does), and the
weights are random but seeded: the same command writes the same files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
from pathlib import Path

# Bumped whenever the recipe below changes, so cached builds are rebuilt.
RECIPE_VERSION = 1

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# A plain role-tagged template, so /v1/chat/completions works without any hub template.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Standard-library modules that make a few MB of ordinary Python source; fixed so the
# trained vocabulary does not depend on what else happens to be installed.
CORPUS_MODULES = [
    "argparse.py", "ast.py", "asyncio", "collections", "csv.py", "dataclasses.py", "datetime.py",
    "email", "functools.py", "http", "inspect.py", "json", "logging", "pathlib.py", "shutil.py",
    "subprocess.py", "textwrap.py", "typing.py", "unittest", "urllib", "zipfile.py",
]


def corpus_files() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files: list[str] = []
    for name in CORPUS_MODULES:
        path = stdlib / name
        if path.is_dir():
            files.extend(str(p) for p in sorted(path.rglob("*.py")) if "test" not in p.parts[-2:-1])
        elif path.is_file():
            files.append(str(path))
    if not files:
        raise SystemExit(f"no Python sources found under {stdlib} to train the tokenizer on")
    return files


def train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(corpus_files(), trainer)
    return tok


def build(out_dir: Path, *, vocab_size: int, hidden_size: int, layers: int, heads: int, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(vocab_size)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    stamp = {
        "recipe_version": RECIPE_VERSION,
        "vocab_size": len(fast),
        "hidden_size": hidden_size,
        "layers": layers,
        "heads": heads,
        "seed": seed,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (out_dir / "saber_tiny_model.json").write_text(json.dumps(stamp, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    # head_dim = hidden/heads = 64: a head size every vLLM CPU attention kernel supports.
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    # Deterministic, single-threaded training; the machine is shared.
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    build(args.out_dir, vocab_size=args.vocab_size, hidden_size=args.hidden_size,
          layers=args.layers, heads=args.heads, seed=args.seed)
    print(json.dumps(json.loads((args.out_dir / "saber_tiny_model.json").read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
