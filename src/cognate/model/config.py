"""Model configuration and named presets, as plain dataclasses (in the style of litgpt's config.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """An invalid configuration; the message names every offending field."""


# Fields older configs hold that no longer change the model; reading such a config drops them.
# mem_min_seq_len switched memory off below a length, which made a token's output depend on the sequence's length
# (memory now runs whenever mem_enabled; see docs/memory.md, "One function of the prefix").
RETIRED_FIELDS = frozenset({"mem_min_seq_len"})


@dataclass(frozen=True)
class CognateConfig:
    # Transformer core.
    vocab_size: int = 32_000
    d_model: int = 216
    n_layers: int = 11
    n_heads: int = 4
    ffn_hidden: int = 864
    max_seq_len: int = 4096
    attn_window: int | None = None  # sliding-window size in tokens; None = full causal attention
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    dropout: float = 0.0

    # Recursive refinement (TRM-style): h_t = core(h_{t-1} + e), logits at every step.
    t_train: int = 4  # refinement steps while training
    t_infer: int = 2  # maximum refinement steps at inference (ACT may stop a token earlier)
    # Training steps 1..t_infer (every step inference may answer from) and the last grad_steps steps carry a loss
    # and gradients; the steps in between run under no_grad.
    grad_steps: int = 2

    # ACT halting.
    act_enabled: bool = True
    act_hidden: int = 92  # width of the halting head's hidden layer (sized so cognate-25m lands near 25.07M)
    act_threshold: float = 0.5  # a token halts at the first step whose halting probability passes this
    act_tolerance: float = 0.1  # L_act's target: halting at step t costs at most this many nats on the token

    # Titans-style long-term memory.
    mem_enabled: bool = True
    # "slots": chunk summaries read by cross-attention (cognate.model.memory); "neural": a small MLP written at test
    # time by gradient steps (cognate.model.neural_memory). Each kind builds only its own tensors.
    mem_kind: str = "slots"
    # Slots per sequence. capacity x chunk (1,024 tokens) is a quarter of the curriculum's 4,096-token long rows, so
    # the write policy decides what a long row keeps (docs/memory.md, "Write policy and eviction").
    mem_capacity: int = 16
    mem_topk: int = 8  # slots each token reads
    mem_dim: int = 272  # width of a memory slot (sized so cognate-25m lands at 25.07M parameters)
    mem_chunk_size: int = (
        64  # tokens per write; a token reads only slots written from strictly earlier chunks
    )
    mem_decay: float = 0.99  # per-chunk retention of a slot's strength (forgetting)
    mem_neural_hidden: int = 128  # hidden width of the neural memory's MLP (mem_kind="neural" only)

    # Loss weights: L = L_ref + w_act * L_act + w_read * L_read + w_write * L_write.
    w_act: float = 0.1
    w_read: float = 0.05
    w_write: float = 0.05

    gradient_checkpointing: bool = False
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        problems = list(_problems(self))
        if problems:
            raise ConfigError("invalid CognateConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def replace(self, **changes) -> CognateConfig:
        """A copy with some fields changed, validated again."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> CognateConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k not in RETIRED_FIELDS}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown CognateConfig fields: {', '.join(unknown)}")
        return cls(**values)


MEMORY_KINDS = ("slots", "neural")


def _problems(c: CognateConfig):
    positive = (
        "vocab_size",
        "d_model",
        "n_layers",
        "n_heads",
        "ffn_hidden",
        "max_seq_len",
        "t_train",
        "t_infer",
        "grad_steps",
        "act_hidden",
        "mem_capacity",
        "mem_topk",
        "mem_dim",
        "mem_chunk_size",
        "mem_neural_hidden",
    )
    for name in positive:
        if getattr(c, name) <= 0:
            yield f"{name}={getattr(c, name)} must be positive"
    if c.n_heads > 0 and c.d_model % c.n_heads:
        yield f"n_heads={c.n_heads} does not divide d_model={c.d_model}"
    elif c.n_heads > 0 and (c.d_model // c.n_heads) % 2:
        yield f"head_dim=d_model/n_heads={c.d_model // c.n_heads} must be even for rotary positions"
    if c.attn_window is not None and c.attn_window <= 0:
        yield f"attn_window={c.attn_window} must be positive or None"
    if c.grad_steps > c.t_train:
        yield f"grad_steps={c.grad_steps} exceeds t_train={c.t_train}"
    if c.mem_kind not in MEMORY_KINDS:
        yield f"mem_kind={c.mem_kind!r} must be one of: {', '.join(repr(k) for k in MEMORY_KINDS)}"
    if c.mem_topk > c.mem_capacity:
        yield f"mem_topk={c.mem_topk} exceeds mem_capacity={c.mem_capacity}"
    if not 0.0 < c.act_threshold < 1.0:
        yield f"act_threshold={c.act_threshold} must lie in (0, 1)"
    if not 0.0 < c.mem_decay <= 1.0:
        yield f"mem_decay={c.mem_decay} must lie in (0, 1]"
    if not 0.0 <= c.dropout < 1.0:
        yield f"dropout={c.dropout} must lie in [0, 1)"
    for name in ("w_act", "w_read", "w_write", "act_tolerance"):
        if getattr(c, name) < 0:
            yield f"{name}={getattr(c, name)} must be non-negative"


# Named presets. `cognate-25m` is the seed models' architecture; `reasoning`, `memory` and `speed` are its
# specializations from the Phase 1 document and differ in the settings that define them (recursion depth, halting,
# memory), not just in their seed. `tiny` trains in minutes on a 2-core CPU.
PRESETS: dict[str, CognateConfig] = {}


def _register(config: CognateConfig) -> None:
    PRESETS[config.name] = config


_BASE = CognateConfig(name="cognate-25m")
_register(_BASE)
_register(_BASE.replace(name="reasoning", t_train=8, t_infer=4, grad_steps=2, act_threshold=0.6))
_register(
    _BASE.replace(
        name="memory",
        t_train=4,
        t_infer=2,
        mem_capacity=32,  # 32 x 64 = 2,048 tokens: half a long row, twice the base's memory
        mem_topk=16,
        attn_window=512,
        max_seq_len=8192,
    )
)
_register(
    _BASE.replace(name="speed", t_train=2, t_infer=1, grad_steps=1, act_threshold=0.4, mem_enabled=False)
)
_register(
    CognateConfig(
        name="tiny",
        vocab_size=32_000,
        d_model=128,
        n_layers=4,
        n_heads=4,
        ffn_hidden=512,
        max_seq_len=1024,
        # Local attention, long range through the memory: the curriculum's 4,096-token rows train at ~2x the
        # speed of full causal attention on a CPU (measured), and the short 512-token rows are unaffected.
        attn_window=512,
        # Two steps, both supervised, both what inference may answer from: a third training step cost a third more
        # per token and bought less than its time was worth at equal wall-clock time (docs/ablation.md).
        t_train=2,
        t_infer=2,
        grad_steps=1,
        mem_capacity=32,  # 32 x 32 = 1,024 tokens: a quarter of a long row, as in cognate-25m
        mem_topk=4,
        mem_dim=64,
        mem_chunk_size=32,
        # The threshold of an uncalibrated model. `cognate pretrain` and `cognate bench ablation` replace it with
        # the one calibrated on validation data (cognate.train.halting): how sharp q is after a short run varies.
        act_threshold=0.65,
    )
)


# Standard Hugging Face config names -> CognateConfig fields, used by the `hf_format/` export so generic tools
# (AutoModel, mergekit, EvoMerge's loader) find vocab_size, hidden_size and the rest at the top of config.json.
HF_CONFIG_NAMES = {
    "vocab_size": "vocab_size",
    "hidden_size": "d_model",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "intermediate_size": "ffn_hidden",
    "max_position_embeddings": "max_seq_len",
    "sliding_window": "attn_window",
    "rope_theta": "rope_theta",
    "rms_norm_eps": "norm_eps",
    "tie_word_embeddings": "tie_embeddings",
}


def get_preset(name: str) -> CognateConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}") from None


SPECIALIZATIONS = ("reasoning", "memory", "speed")
# The fields that fix the tensors' shapes: a specialization keeps them, so the seeds of every specialization of one
# size stay mergeable. The memory kind is one of them: it decides which memory's tensors the model has.
SIZE_FIELDS = frozenset(
    {
        "vocab_size",
        "d_model",
        "n_layers",
        "n_heads",
        "ffn_hidden",
        "act_hidden",
        "mem_dim",
        "tie_embeddings",
        "mem_kind",
        "mem_neural_hidden",
    }
)
# The settings that define a specialization: every field in which some specialization's preset differs from the
# base, except the size. `specialize(config, "memory")` keeps the size of `config` (a `tiny` model stays tiny) and
# takes these from the specialization's preset.
SPECIALIZATION_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(CognateConfig)
    if f.name != "name"
    and f.name not in SIZE_FIELDS
    and any(getattr(PRESETS[s], f.name) != getattr(_BASE, f.name) for s in SPECIALIZATIONS)
)


def specialize(config: CognateConfig, specialization: str) -> CognateConfig:
    if specialization not in SPECIALIZATIONS:
        raise ConfigError(
            f"unknown specialization {specialization!r}; choose one of: {', '.join(SPECIALIZATIONS)}"
        )
    source = PRESETS[specialization]
    changes = {name: getattr(source, name) for name in SPECIALIZATION_FIELDS}
    if changes["attn_window"] is not None:
        changes["attn_window"] = min(changes["attn_window"], config.max_seq_len)
    return config.replace(name=f"{config.name}-{specialization}", **changes)
