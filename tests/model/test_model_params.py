"""Parameter counts, presets, configuration errors and `cognate info`."""

import json

import pytest
import torch

from cognate.cli import main
from cognate.model.config import PRESETS, SPECIALIZATIONS, CognateConfig, ConfigError, get_preset, specialize
from cognate.model.model import CognateModel
from cognate.model.params import COMPONENTS, parameter_breakdown, total_parameters


def _meta_model(config: CognateConfig) -> CognateModel:
    with torch.device("meta"):
        return CognateModel(config)


def test_cognate_25m_lands_in_the_target_range_with_the_seed_architecture():
    model = _meta_model(get_preset("cognate-25m"))
    total, breakdown = total_parameters(model), parameter_breakdown(model)
    assert 25_000_000 <= total <= 25_140_000
    assert sum(breakdown.values()) == total and set(breakdown) == set(COMPONENTS)
    # The transformer core is the seeds' exactly: 32k x 216 embeddings and head, 11 x (4·216² attention +
    # 3·216·864 SwiGLU), two RMSNorms per layer plus the final one.
    assert breakdown["embeddings"] == breakdown["lm_head"] == 6_912_000
    assert breakdown["blocks"] == 11 * (186_624 + 559_872)
    assert breakdown["norms"] == 11 * 432 + 216
    assert breakdown["memory"] > 0 and breakdown["act_head"] > 0


def test_the_parameter_budget_is_the_table_of_docs_architecture():
    # docs/architecture.md, "Parameter budget": every row of the cognate-25m table, and tiny's total with a 32k
    # vocabulary.
    model = _meta_model(get_preset("cognate-25m"))
    assert parameter_breakdown(model) == {
        "embeddings": 6_912_000,
        "blocks": 8_211_456,
        "norms": 4_968,
        "memory": 3_013_849,
        "act_head": 20_057,
        "lm_head": 6_912_000,
    }
    assert total_parameters(model) == 25_074_330
    assert total_parameters(_meta_model(get_preset("tiny").replace(vocab_size=32_000))) == 9_541_818


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_its_breakdown_sums_to_the_total(name):
    model = _meta_model(get_preset(name))
    assert sum(parameter_breakdown(model).values()) == total_parameters(model)


def test_tied_embeddings_count_once_under_embeddings():
    untied = _meta_model(get_preset("tiny"))
    tied = _meta_model(get_preset("tiny").replace(tie_embeddings=True))
    assert parameter_breakdown(tied)["lm_head"] == 0
    assert total_parameters(untied) - total_parameters(tied) == parameter_breakdown(untied)["lm_head"]


@pytest.mark.parametrize("specialization", SPECIALIZATIONS)
def test_specializations_keep_the_same_tensors_so_the_seeds_stay_mergeable(specialization):
    base = _meta_model(get_preset("tiny")).state_dict()
    special = _meta_model(specialize(get_preset("tiny"), specialization)).state_dict()
    assert {k: v.shape for k, v in base.items()} == {k: v.shape for k, v in special.items()}


def test_an_invalid_config_names_every_bad_field_at_once():
    with pytest.raises(ConfigError) as error:
        CognateConfig(d_model=100, n_heads=3, mem_topk=80, mem_capacity=64, act_hidden=0)
    message = str(error.value)
    assert "n_heads=3" in message and "mem_topk=80" in message and "act_hidden=0" in message


def test_info_prints_json_with_a_breakdown_that_sums_to_the_total(capsys):
    assert main(["info", "--preset", "cognate-25m", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert sum(info["breakdown"].values()) == info["total_params"]
    assert info["config"]["d_model"] == 216 and info["per_layer"]["attn"] == 186_624


def test_info_prints_a_readable_table(capsys):
    assert main(["info", "--preset", "tiny", "--model", "speed"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("tiny-speed: ") and "embeddings" in table and "t_infer" in table


@pytest.mark.parametrize("specialization", SPECIALIZATIONS)
def test_specialize_carries_every_field_that_defines_the_specialization(specialization):
    base = get_preset("cognate-25m")
    assert specialize(base, specialization) == get_preset(specialization)  # names aside (compare=False)
    tiny = specialize(get_preset("tiny"), specialization)
    preset = get_preset(specialization)
    for name in (
        "mem_capacity",
        "mem_topk",
        "t_train",
        "t_infer",
        "grad_steps",
        "act_threshold",
        "mem_enabled",
    ):
        assert getattr(tiny, name) == getattr(preset, name), name
    assert tiny.d_model == get_preset("tiny").d_model  # the size stays
