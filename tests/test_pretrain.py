"""`cognate pretrain`: three seed models in the EvoMerge layout, a registry and a summary, and a re-run that
skips what is finished."""

import contextlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from cognate.data.prepare import PrepareConfig, prepare
from cognate.export.model_dir import load_model_dir
from cognate.model.config import get_preset
from cognate.model.model import CognateModel
from cognate.pretrain import REGISTRY, SEEDS, SUMMARY, WARMUP_DIR, PretrainPlan, pretrain
from cognate.train import checkpoint, trainer
from cognate.train.config import TrainConfig
from cognate.train.data import TrainingData
from cognate.train.distributed import Distributed

MODEL = dict(
    d_model=32,
    n_heads=2,
    n_layers=1,
    ffn_hidden=64,
    t_train=2,
    t_infer=2,
    grad_steps=1,
    mem_dim=16,
    mem_capacity=8,
    mem_topk=2,
    mem_chunk_size=32,
    max_seq_len=256,
)
SEED_FILES = (
    "pytorch_model.bin",
    "model.safetensors",
    "config.json",
    "training_stats.json",
    "README.md",
    "tokenizer.json",
    "hf_format/modeling_cognate.py",
    "hf_format/model.safetensors",
    "hf_format/config.json",
    "hf_format/tokenizer.json",
)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    data = root / "data"
    prepare(PrepareConfig(out=data, builtin=True, short_len=64, long_len=256), log=lambda _: None)
    vocab = json.loads((data / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    plan = PretrainPlan(
        model=get_preset("tiny").replace(vocab_size=vocab, **MODEL),
        train=TrainConfig(
            batch_size=2,
            grad_accum=1,
            max_tokens=10_000,
            warmup_tokens=0,
            eval_interval=2,
            eval_batches=2,
            log_interval=1,
            checkpoint_interval=2,
            bf16=False,
            sample_prompts=(),
        ),
        warmup_tokens=256,
        seed_tokens=1536,  # 6 to 12 updates: room for a checkpoint before the last one
        eval_batches=2,
    )
    dist = _single()
    summary = pretrain(plan, data, root / "out", dist)
    return plan, data, root / "out", summary, dist


def test_three_seed_models_with_every_file(pretrained):
    _, _, out, summary, _ = pretrained
    assert summary["successful_models"] == summary["total_models"] == 3 and summary["evomerge_ready"]
    for index in (1, 2, 3):
        folder = out / f"tiny-model-{index}"
        for name in SEED_FILES:
            assert (folder / name).is_file(), f"{folder.name}/{name} missing"
        config = json.loads((folder / "config.json").read_text())
        assert config["vocab_size"] == summary["plan"]["model"]["vocab_size"]  # top level, where loaders look


def test_registry_lists_the_three_seeds_and_how_they_stay_mergeable(pretrained):
    _, _, out, _, _ = pretrained
    registry = json.loads((out / REGISTRY).read_text())
    assert [m["seed"] for m in registry["seed_models"]] == list(SEEDS)
    assert len({m["config_hash"] for m in registry["seed_models"]}) == 1
    assert (
        registry["mergeability"]["init_seed"] == 0 and registry["mergeability"]["shared_warmup_tokens"] == 256
    )
    for model in registry["seed_models"]:
        assert (out / model["files"]["safetensors"]).is_file()
        assert model["parameters"] > 0 and model["metrics"]["val_loss"] > 0


def _val_loss(model, plan, data) -> float:
    batches = TrainingData(data, batch_size=plan.train.batch_size, seed=0, dist=_single())
    return trainer.validate(model, batches, plan.eval_batches, contextlib.nullcontext, _single())["val_loss"]


def test_summary_measures_the_plain_average_against_each_seed(pretrained):
    plan, data, out, _, _ = pretrained
    summary = json.loads((out / SUMMARY).read_text())
    check = summary["merge_check"]
    assert set(check["seed_val_losses"]) == {"tiny-model-1", "tiny-model-2", "tiny-model-3"}
    assert check["best_seed_val_loss"] == min(check["seed_val_losses"].values())
    assert check["average_minus_best_seed"] == pytest.approx(
        check["average_val_loss"] - check["best_seed_val_loss"]
    )
    # The "average" is the element-wise mean of the three seeds' saved weights, computed here by hand.
    seeds = [load_file(out / f"tiny-model-{i}" / "model.safetensors") for i in (1, 2, 3)]
    average = CognateModel(plan.model)
    average.load_state_dict(
        {name: (seeds[0][name] + seeds[1][name] + seeds[2][name]) / 3 for name in seeds[0]}
    )
    assert check["average_val_loss"] == pytest.approx(_val_loss(average, plan, data), rel=1e-5)
    for name, loss in check["seed_val_losses"].items():
        assert loss == pytest.approx(_val_loss(load_model_dir(out / name), plan, data), rel=1e-5)
    assert min(abs(check["average_val_loss"] - loss) for loss in check["seed_val_losses"].values()) > 1e-4


def test_seeds_differ_but_share_their_start(pretrained):
    _, _, out, _, _ = pretrained
    shared = load_file(out / "shared-warmup" / "model.safetensors")
    seeds = [load_file(out / f"tiny-model-{i}" / "model.safetensors") for i in (1, 2, 3)]
    name = "lm_head.weight"
    assert not torch.equal(seeds[0][name], seeds[1][name])
    for seed in seeds:  # a few small steps from the shared weights: much closer to them than to a fresh init
        assert (seed[name] - shared[name]).norm() < 0.5 * shared[name].norm()


def test_a_rerun_skips_finished_seeds(pretrained):
    plan, data, out, _, dist = pretrained
    again = pretrain(plan, data, out, dist)
    assert [m.get("skipped") for m in again["models"]] == [True, True, True]
    assert again["evomerge_ready"]


def test_summary_table_shows_what_each_seed_learned(pretrained):
    from cognate.pretrain import format_table

    _, _, _, summary, _ = pretrained
    for entry in summary["models"]:
        assert 0.0 <= entry["metrics"]["heldout_synthetic_solution_accuracy"] <= 1.0
    table = format_table(summary)
    assert all(entry["name"] in table for entry in summary["models"])
    assert "held-out arithmetic" in table and "merge check: plain average" in table


class _Oracle(torch.nn.Module):
    """Predicts the next input token exactly (shift=1) or repeats the current one (shift=0)."""

    def __init__(self, vocab: int, shift: int):
        super().__init__()
        self.vocab, self.shift, self.weight = vocab, shift, torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        nxt = torch.roll(input_ids, -self.shift, dims=1)
        return type("Out", (), {"logits": torch.nn.functional.one_hot(nxt, self.vocab).float()})


def test_heldout_accuracy_scores_next_token_predictions_of_the_solution(pretrained):
    import contextlib

    from cognate.pretrain import heldout_solution_accuracy

    _, data, _, _, _ = pretrained
    vocab = json.loads((data / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    assert heldout_solution_accuracy(_Oracle(vocab, 1), data, contextlib.nullcontext) == 1.0
    assert heldout_solution_accuracy(_Oracle(vocab, 0), data, contextlib.nullcontext) < 0.2


def test_an_untrained_model_predicts_almost_none_of_the_solution_tokens(pretrained):
    # README: the seeds predict about 40% of the worked-solution tokens exactly, "an untrained model gets ~0".
    from cognate.pretrain import heldout_solution_accuracy

    plan, data, _, _, _ = pretrained
    torch.manual_seed(0)
    untrained = CognateModel(get_preset("tiny").replace(vocab_size=plan.model.vocab_size))
    assert heldout_solution_accuracy(untrained, data, contextlib.nullcontext) < 0.02


def test_a_rerun_resumes_an_unfinished_seed_from_its_checkpoint(pretrained, tmp_path, monkeypatch):
    # Seeds 1 and 3 and the shared warm-up are copied finished; seed 2 dies at its last update, after the last
    # checkpoint (every 2 updates). The re-run must do the updates after that checkpoint only, and end on the
    # uninterrupted seed's weights, bit for bit.
    plan, data, finished, _, dist = pretrained
    total = json.loads((finished / "tiny-model-2" / "training_stats.json").read_text())["training"]["steps"]
    saved = (total - 1) // plan.train.checkpoint_interval * plan.train.checkpoint_interval
    assert saved >= 2
    out = tmp_path / "out"
    for name in (WARMUP_DIR, "tiny-model-1", "tiny-model-3"):
        shutil.copytree(finished / name, out / name)
    original = trainer.CognateModel.forward
    updates = {"n": 0}

    def dies_at_the_last_update(self, *args, **kwargs):
        if (
            self.training and torch.is_grad_enabled()
        ):  # a training forward (not the checkpoint's soundness check)
            updates["n"] += 1
            if updates["n"] == total:
                raise RuntimeError("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer.CognateModel, "forward", dies_at_the_last_update)
    interrupted = pretrain(plan, data, out, dist)
    assert [m["succeeded"] for m in interrupted["models"]] == [True, False, True]
    run = out / "tiny-model-2" / "run"
    assert checkpoint.load(run / trainer.CHECKPOINT)["progress"]["step"] == saved

    def counts(self, *args, **kwargs):
        updates["n"] += self.training and torch.is_grad_enabled()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer.CognateModel, "forward", counts)
    updates["n"] = 0
    resumed = pretrain(plan, data, out, dist)
    assert [m.get("skipped", False) for m in resumed["models"]] == [True, False, True]
    assert resumed["evomerge_ready"]
    assert updates["n"] == total - saved  # one micro-batch per update; a restart would train all of them
    ours, straight = (load_file(folder / "tiny-model-2" / "model.safetensors") for folder in (out, finished))
    assert ours.keys() == straight.keys()
    assert all(torch.equal(ours[name], straight[name]) for name in ours)


def _single() -> Distributed:
    return Distributed(rank=0, world_size=1, device=torch.device("cpu"))


def test_seeds_continue_the_warm_ups_optimizer_state(pretrained):
    out = pretrained[2]
    from cognate.train import checkpoint

    def adamw_steps(state: dict) -> dict[int, int]:
        return {
            key: int(entry["step"]) for key, entry in state["optimizer"]["state"].items() if "step" in entry
        }

    warmup = checkpoint.load(out / "shared-warmup" / "checkpoint.pt")
    assert max(adamw_steps(warmup).values()) == warmup["progress"]["step"] > 0
    for index in (1, 2, 3):
        seed = checkpoint.load(out / f"tiny-model-{index}" / "run" / "checkpoint.pt")
        # A fresh optimizer could count at most the seed's own updates; the embeddings are updated at every step.
        total = warmup["progress"]["step"] + seed["progress"]["step"]
        assert max(adamw_steps(seed).values()) == total
