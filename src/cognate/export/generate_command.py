"""`cognate generate`: continue a prompt with a model folder (greedy by default, or sampled) and print the text."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cognate.train.precision import GENERATION_BF16_DEFAULT, add_bf16_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=Path, required=True, help="a model folder (config.json, weights, tokenizer)"
    )
    parser.add_argument("--prompt", required=True, help="the text to continue ('-' reads it from stdin)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)"
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy decoding (default)")
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling: keep this much probability mass"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler (with --temperature > 0)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    add_bf16_argument(parser, default=GENERATION_BF16_DEFAULT)


def run(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        print(prompt + generate_text(args.model, prompt, args), flush=True)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def generate_text(model_dir: Path, prompt: str, args: argparse.Namespace) -> str:
    """The continuation of `prompt`, up to the end-of-text token. The prompt follows an end-of-text token, as a
    document does in the packed training rows."""
    import torch

    from cognate.data.tokenizer import encode_texts, load_tokenizer
    from cognate.export.model_dir import load_model_dir
    from cognate.train.precision import autocast_for, resolve_precision

    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model folder (no config.json)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(model_dir)
    model = load_model_dir(model_dir, device)
    eos = tokenizer.eos_token_id
    ids = torch.tensor([[eos, *encode_texts(tokenizer, [prompt])[0].tolist()]], device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    with autocast_for(device, resolve_precision(args.bf16, device).bf16)():
        out = model.generate(
            ids,
            args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            eos_token_id=eos,
            generator=generator,
        )
    new = out[0, ids.size(1) :].tolist()
    return tokenizer.decode(new[: new.index(eos)] if eos in new else new)
