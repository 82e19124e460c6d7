"""`cognate bench generate`: generation tokens/s with and without the KV cache, and through the Hugging Face export.

In one process, on the same weights and the same random prompt, greedy decoding of `--new-tokens` tokens by
    cached    the native `CognateModel.generate`: one KV cache per refinement step and layer, memory carried
    uncached  the same with `use_cache=False`: the whole sequence evaluated again for every new token
    hf        the weights exported with `export_hf` to a temporary folder, loaded with
              `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`, `.generate(do_sample=False)`
each timed after an untimed warm-up. Tokens/s counts the generated tokens of the whole batch over the wall time of
the call, prompt processing included. Whether the export really uses a cache is measured, not assumed: a hook
records the length of every input its model is given (a cached decoder sees one token per call after the prompt).

Halting is measured against forcing every step (`halting_report`):
    halting     the cached arm again: a token that halts skips its later steps but their key/value projections
    forced      the same weights with act_enabled=False: every refinement step for every token
timed alternately (median of `--repeats` each), so that a change in the machine's load hits both alike, on prompts
cut from the validation rows of `--data` (default: the data folder the model's training_stats.json names; the random
prompt without one: `halting_prompt` says which); with the mean halting step of the generated tokens, and
halting_loss_delta, the validation loss with halting minus with every step on that data (null without it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

from cognate.model.config import get_preset
from cognate.model.model import CognateModel
from cognate.train.precision import (
    GENERATION_BF16_DEFAULT,
    add_bf16_argument,
    autocast_for,
    resolve_precision,
)
from cognate.train.throughput import synchronize
from cognate.train.trainer import validate

HALTING_VALIDATION_BATCHES = 16  # batches of 4 validation rows for halting_loss_delta

WARMUP_TOKENS = 2  # untimed tokens per arm first: allocations, kernel selection, the library's lazy imports


def timed_generation(generate, device: torch.device, repeats: int) -> tuple[Tensor, float]:
    """The output of `generate()` and the median seconds of `repeats` timed calls, after one untimed call."""
    generate(warmup=True)
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        out = generate(warmup=False)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return out, sorted(seconds)[len(seconds) // 2]


def native_generate(model: CognateModel, prompt: Tensor, new_tokens: int, use_cache: bool, autocast):
    def generate(warmup: bool) -> Tensor:
        with autocast():
            return model.generate(prompt, WARMUP_TOKENS if warmup else new_tokens, use_cache=use_cache)

    return generate


def hf_generate(hf_model, prompt: Tensor, new_tokens: int, use_cache: bool, autocast):
    def generate(warmup: bool) -> Tensor:
        n = WARMUP_TOKENS if warmup else new_tokens
        with autocast(), torch.no_grad():
            return hf_model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                use_cache=use_cache,
                pad_token_id=0,  # the export without a tokenizer names no pad token; nothing is padded here
            )

    return generate


def load_hf_export(model: CognateModel, folder: Path, device: torch.device):
    """The model exported with the project's `export_hf` and loaded back as transformers loads any folder."""
    from transformers import AutoModelForCausalLM

    from cognate.export.hf import export_hf

    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    export_hf(state, model.cfg, folder)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    return hf_model.to(device).eval()


def input_lengths_seen(module: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """A list that fills with the sequence length of every call to `module`, and the hook's handle."""
    lengths: list[int] = []

    def record(_module, args, kwargs):
        input_ids = args[0] if args else kwargs["input_ids"]
        lengths.append(input_ids.size(1))

    return lengths, module.register_forward_pre_hook(record, with_kwargs=True)


def build_model(args: argparse.Namespace, device: torch.device) -> CognateModel:
    if args.model is not None:
        from cognate.export.model_dir import load_model_dir

        if not (args.model / "config.json").is_file():
            raise SystemExit(f"--model {args.model} is not a model folder (no config.json)")
        return load_model_dir(args.model, device)
    torch.manual_seed(args.seed)
    return CognateModel(get_preset(args.preset)).to(device).eval()


def measure(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(args, device)
    cfg = model.cfg
    if args.prompt_len + args.new_tokens > cfg.max_seq_len:
        raise SystemExit(
            f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} exceeds the model's "
            f"max_seq_len={cfg.max_seq_len}"
        )
    generator = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(cfg.vocab_size, (args.batch_size, args.prompt_len), generator=generator).to(device)
    precision = resolve_precision(args.bf16, device)
    autocast = autocast_for(device, precision.bf16)
    generated = args.batch_size * args.new_tokens

    def report_arm(name: str, seconds: float) -> float:
        tokens_per_s = generated / seconds
        if not args.json:
            print(f"{name:>12}: {tokens_per_s:9.1f} tokens/s ({seconds:.2f} s)", file=sys.stderr)
        return tokens_per_s

    outputs, report = {}, {}
    for name, use_cache in (("cached", True), ("uncached", False)):
        arm = native_generate(model, prompt, args.new_tokens, use_cache, autocast)
        outputs[name], seconds = timed_generation(arm, device, args.repeats)
        report[f"{name}_tokens_per_s"] = report_arm(name, seconds)

    with tempfile.TemporaryDirectory(prefix="cognate-bench-hf-") as folder:
        hf_model = load_hf_export(model, Path(folder), device)
        lengths, hook = input_lengths_seen(hf_model)
        outputs["hf"], seconds = timed_generation(
            hf_generate(hf_model, prompt, args.new_tokens, True, autocast), device, args.repeats
        )
        hook.remove()
        report["hf_tokens_per_s"] = report_arm("hf", seconds)
        # The last timed call's inputs: one length per forward; after the prompt, 1 means a cached step.
        calls = lengths[-args.new_tokens :]
        report["hf_uses_kv_cache"] = len(calls) > 1 and max(calls[1:]) == 1
        report["hf_uncached_tokens_per_s"] = None
        if report["hf_uses_kv_cache"]:
            outputs["hf_uncached"], seconds = timed_generation(
                hf_generate(hf_model, prompt, args.new_tokens, False, autocast), device, args.repeats
            )
            report["hf_uncached_tokens_per_s"] = report_arm("hf_uncached", seconds)

    report |= halting_report(model, prompt, args, autocast, report_arm)
    report["cache_speedup"] = report["cached_tokens_per_s"] / report["uncached_tokens_per_s"]
    report["hf_vs_native"] = report["hf_tokens_per_s"] / report["cached_tokens_per_s"]
    report["hf_vs_native_uncached"] = report["hf_tokens_per_s"] / report["uncached_tokens_per_s"]
    mismatched = [name for name, out in outputs.items() if not torch.equal(out, outputs["cached"])]
    report["same_tokens"] = not mismatched
    report["mismatched_arms"] = mismatched
    report["settings"] = {
        "model": str(args.model) if args.model is not None else f"fresh {args.preset}",
        "t_infer": cfg.t_infer,
        "mem_enabled": cfg.mem_enabled,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "batch_size": args.batch_size,
        "decoding": "greedy",
        "bf16": precision.bf16,
        "bf16_setting": args.bf16,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "warmup_tokens": WARMUP_TOKENS,
        "seed": args.seed,
        "torch": torch.__version__,
        "transformers": _transformers_version(),
    }
    return report


def halting_report(
    model: CognateModel, random_prompt: Tensor, args: argparse.Namespace, autocast, report_arm
) -> dict:
    """Generation tokens/s with halting and with every step forced, the halting steps, and the loss of halting.

    With validation data the prompts are the first `--prompt-len` tokens of its rows: halting is a decision about
    the text at hand, and on random tokens (out of distribution for any trained model) it measures nothing a user
    meets. Without data the random prompt stands in, and the report says which was used.
    """
    device = random_prompt.device
    data_dir = args.data or _training_data(args.model)
    data = None
    if data_dir is not None:
        from cognate.train.data import TrainingData
        from cognate.train.distributed import Distributed

        dist = Distributed(rank=0, world_size=1, device=device)
        data = TrainingData(data_dir, batch_size=4, seed=0, dist=dist)
    prompt = random_prompt
    if data is not None:
        rows = torch.cat([batch.input_ids for batch in data.validation_batches(args.batch_size)])
        if len(rows) >= args.batch_size and rows.size(1) >= args.prompt_len:
            prompt = rows[: args.batch_size, : args.prompt_len].to(device)
    forced = CognateModel(model.cfg.replace(act_enabled=False)).to(device).eval()
    forced.load_state_dict(model.state_dict())
    seconds: dict[str, list[float]] = {"halting": [], "forced": []}
    for _ in range(args.repeats):  # alternated, so a change in the machine's load hits both arms alike
        for name, arm in (("halting", model), ("forced", forced)):
            out, elapsed = timed_generation(
                native_generate(arm, prompt, args.new_tokens, True, autocast), device, 1
            )
            seconds[name].append(elapsed)
            if name == "halting":
                generated = out
    report = {
        f"{name}_tokens_per_s": report_arm(name, sorted(times)[len(times) // 2])
        for name, times in seconds.items()
    }
    report["halting_prompt"] = "random" if prompt is random_prompt else "validation"
    # Halting steps of the positions whose predictions were the generated tokens, by the rule generation used.
    with torch.no_grad(), autocast():
        steps = model(generated).act["steps"][:, prompt.size(1) - 1 : -1]
    report["halting_mean_steps"] = steps.float().mean().item()
    report["halting_speedup"] = report["halting_tokens_per_s"] / report["forced_tokens_per_s"]
    report["halting_loss_delta"] = None
    if data is not None:
        with_halting, every_step = (
            validate(arm, data, HALTING_VALIDATION_BATCHES, autocast, dist)["val_loss"]
            for arm in (model, forced)
        )
        report["halting_loss_delta"] = with_halting - every_step
        model.eval()  # validate() leaves its model in training mode
    report["halting_data"] = str(data_dir) if data_dir is not None else None
    return report


def _training_data(model_dir: Path | None) -> Path | None:
    """The data folder a model folder's training_stats.json names, if it still exists."""
    stats = model_dir / "training_stats.json" if model_dir is not None else None
    if stats is None or not stats.is_file():
        return None
    folder = json.loads(stats.read_text()).get("data")
    return Path(folder) if folder and Path(folder).is_dir() else None


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print only the JSON line on stdout")
    parser.add_argument("--preset", default="cognate-25m", help="a freshly initialised preset (default)")
    parser.add_argument("--model", type=Path, default=None, help="a trained model folder instead of --preset")
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="prepared folder for halting_loss_delta (default: the model's)",
    )
    parser.add_argument(
        "--prompt-len", type=_positive, default=128, help="random prompt tokens (default 128)"
    )
    parser.add_argument("--new-tokens", type=_positive, default=64, help="tokens to generate (default 64)")
    parser.add_argument("--batch-size", type=_positive, default=1)
    parser.add_argument("--repeats", type=_positive, default=1, help="timed calls per arm; the median counts")
    add_bf16_argument(parser, default=GENERATION_BF16_DEFAULT)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt and of a fresh model")


def run(args: argparse.Namespace) -> int:
    print(json.dumps(measure(args)))
    return 0
