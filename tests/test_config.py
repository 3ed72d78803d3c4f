import json

import pytest

from cqil_kernels import CQILConfig


def test_groups_are_normalised_and_saved_layers_counted():
    cfg = CQILConfig(groups=[[14, 15], [12, 13]], bypass=1)
    assert cfg.groups == ((12, 13), (14, 15))
    assert cfg.layers_saved == 2
    assert CQILConfig().groups == () and CQILConfig().layers_saved == 0


def test_from_range_covers_range_with_short_tail():
    assert CQILConfig.from_range(12, 30, 2).groups == tuple((i, i + 1) for i in range(12, 30, 2))
    assert CQILConfig.from_range(14, 30, 4).groups == ((14, 15, 16, 17), (18, 19, 20, 21),
                                                       (22, 23, 24, 25), (26, 27, 28, 29))
    assert CQILConfig.from_range(12, 17, 2).groups == ((12, 13), (14, 15), (16,))
    assert CQILConfig.from_range(3, 9, 3, bypass=2).bypass == 2


def test_stages_interleave_groups_and_single_layers():
    cfg = CQILConfig([[2, 3], [4, 5, 6]])
    assert cfg.stages(8) == [(0,), (1,), (2, 3), (4, 5, 6), (7,)]
    assert CQILConfig().stages(3) == [(0,), (1,), (2,)]


def test_authors_config_keys(tmp_path):
    authors = {"architectures": ["LlamaForCausalLM"], "d": 1,
               "cqil_layers": [[12, 13], [14, 15]], "cqil_layers_p4": [[14, 15, 16, 17]]}
    cfg = CQILConfig.from_hf_config(authors)
    assert cfg == CQILConfig([[12, 13], [14, 15]], bypass=1)
    (tmp_path / "config.json").write_text(json.dumps(authors))
    assert CQILConfig.from_hf_config(tmp_path) == cfg
    assert CQILConfig.from_hf_config(tmp_path / "config.json") == cfg
    assert CQILConfig.from_hf_config({"model_type": "llama"}) is None


def test_json_round_trip(tmp_path):
    cfg = CQILConfig([[3, 4, 5]], bypass=2, bypass_mode="mlp_input")
    cfg.save(tmp_path / "groups.json")
    assert CQILConfig.load(tmp_path / "groups.json") == cfg
    data = json.loads((tmp_path / "groups.json").read_text())
    assert data["cqil_layers"] == [[3, 4, 5]] and data["d"] == 2


@pytest.mark.parametrize("groups, bypass, message", [
    ([[12, 14]], 0, r"group \[12, 14\] is not a run of consecutive"),
    ([[13, 12]], 0, r"group \[13, 12\] is not a run of consecutive"),
    ([[12, 13], [13, 14]], 0, r"groups \[12, 13\] and \[13, 14\] overlap at layer 13"),
    ([[]], 0, r"empty group"),
    ([[-1, 0]], 0, r"layer index -1 is negative"),
    ([[1, 2]], -1, r"bypass \(d\) must be >= 0"),
])
def test_invalid_groups_name_the_group_and_the_rule(groups, bypass, message):
    with pytest.raises(ValueError, match=message):
        CQILConfig(groups, bypass=bypass)


def test_validate_against_model_size():
    with pytest.raises(ValueError, match=r"group \[29, 30\]: layer index 30 is outside the model "
                                         r"\(it has 30 layers"):
        CQILConfig([[29, 30]]).validate(30)
    CQILConfig([[28, 29]]).validate(30)


@pytest.mark.parametrize("bad", ["12,13", [[1.0, 2.0]], 5, [["a"]]])
def test_wrong_types_raise_type_error(bad):
    with pytest.raises(TypeError):
        CQILConfig(bad)


def test_bad_bypass_mode_and_range():
    with pytest.raises(ValueError, match="bypass_mode"):
        CQILConfig([[1, 2]], bypass_mode="both")
    with pytest.raises(ValueError, match="start < end"):
        CQILConfig.from_range(5, 5, 2)
    with pytest.raises(ValueError, match="parallel must be >= 1"):
        CQILConfig.from_range(1, 5, 0)
    with pytest.raises(TypeError, match="bypass must be an int"):
        CQILConfig([[1, 2]], bypass=1.5)


def test_load_without_groups_key(tmp_path):
    (tmp_path / "x.json").write_text('{"d": 0}')
    with pytest.raises(ValueError, match="no 'cqil_layers' key"):
        CQILConfig.load(tmp_path / "x.json")
    with pytest.raises(FileNotFoundError):
        CQILConfig.load(tmp_path / "missing.json")


def test_llama_args_round_trip_through_transformers_config():
    from transformers import LlamaConfig

    from cqil_kernels import LlamaArgs

    args = LlamaArgs(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                     rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=True)
    assert LlamaArgs.from_hf(args.to_hf_dict()) == args
    assert LlamaArgs.from_hf(LlamaConfig(**args.to_hf_dict())) == args


@pytest.mark.parametrize("change, message", [
    ({"num_attention_heads": 5}, "must be a multiple of num_key_value_heads"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn' is not supported"),
    ({"hidden_size": 0}, "hidden_size must be a positive int"),
])
def test_llama_args_reject_unsupported_configs(change, message):
    from cqil_kernels import LlamaArgs

    config = {"model_type": "llama", "vocab_size": 10, "hidden_size": 16, "intermediate_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, **change}
    with pytest.raises(ValueError, match=message):
        LlamaArgs.from_hf(config)


@pytest.mark.parametrize("text, message", [
    ('"cqil_layers"', "must hold a JSON object at the top level, got string"),
    ("null", "must hold a JSON object at the top level, got null"),
    ('{"cqil_layers": "12,13"}', "groups must be a list"),
    ('{"cqil_layers": [[1, 2]], "d": "1"}', "bypass must be an int"),
])
def test_cqil_json_of_the_wrong_shape_is_refused(tmp_path, text, message):
    (tmp_path / "groups.json").write_text(text)
    with pytest.raises((ValueError, TypeError), match=message):
        CQILConfig.load(tmp_path / "groups.json")


def test_cqil_json_of_random_bytes_names_the_file(tmp_path):
    (tmp_path / "groups.json").write_bytes(bytes(range(128, 256)))
    with pytest.raises(ValueError, match="groups.json: the config file is not UTF-8"):
        CQILConfig.load(tmp_path / "groups.json")
