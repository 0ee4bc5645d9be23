"""QATConfig / TrainConfig / LayerRule / QuantSpec validation, dict and YAML loading."""
from __future__ import annotations

import dataclasses
import re

import pytest

from qatkit.config import (
    LayerRule,
    QATConfig,
    QuantSpec,
    TrainConfig,
    load_yaml,
    qat_config_from_dict,
    to_dict,
    train_config_from_dict,
)
from qatkit.errors import ConfigError

BAD_BITS = [1, 9, "8", 4.5, True, -4, 0]


# ---- bits ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", BAD_BITS)
@pytest.mark.parametrize("field", ["weight_bits", "act_bits", "first_last_bits", "output_bits", "residual_bits"])
def test_qat_config_rejects_bad_bits_naming_field_and_value(field, bits):
    with pytest.raises(ConfigError, match=rf"^{field} = {re.escape(repr(bits))} is not allowed; allowed: an integer from 2 to 8"):
        QATConfig(**{field: bits})


@pytest.mark.parametrize("bits", [*BAD_BITS, None])
def test_quant_spec_rejects_bad_bits(bits):
    with pytest.raises(ConfigError, match=rf"^bits = {re.escape(repr(bits))} is not allowed"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("bits", BAD_BITS)
def test_layer_rule_rejects_bad_bits_naming_the_rule(bits):
    with pytest.raises(ConfigError, match=rf"^rule 'layer1\.\*' act_bits = {re.escape(repr(bits))} is not allowed"):
        LayerRule(pattern="layer1.*", act_bits=bits)


@pytest.mark.parametrize("bits", range(2, 9))
def test_every_valid_bit_width_is_accepted(bits):
    assert QATConfig(weight_bits=bits, act_bits=bits, first_last_bits=bits).weight_bits == bits
    spec = QuantSpec(bits=bits)
    assert spec.qrange == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert QuantSpec(bits=bits, signed=False, narrow=True).qrange == (0, 2**bits - 2)


@pytest.mark.parametrize("field", ["first_last_bits", "output_bits", "residual_bits"])
def test_optional_bits_none_is_allowed(field):
    assert getattr(QATConfig(**{field: None}), field) is None


# ---- init methods, choices, numbers ---------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [({"weight_init": "max"}, "weight_init"), ({"act_init": "MSE"}, "act_init")])
def test_unknown_init_method_is_named_with_the_allowed_ones(kwargs, field):
    value = next(iter(kwargs.values()))
    with pytest.raises(ConfigError, match=rf"^{field} = '{value}' is not allowed; allowed: minmax, percentile, mse"):
        QATConfig(**kwargs)


def test_quant_spec_unknown_init():
    with pytest.raises(ConfigError, match=r"^init = 'kl' is not allowed; allowed: minmax, percentile, mse"):
        QuantSpec(init="kl")


def test_layer_rule_needs_a_non_empty_pattern():
    with pytest.raises(ConfigError, match=r"^rule pattern = '' is not allowed"):
        LayerRule(pattern="")
    with pytest.raises(ConfigError, match=r"^rule pattern = 3 is not allowed"):
        LayerRule(pattern=3)


@pytest.mark.parametrize("penalty", ["*.weight", 1e-4, [("*.weight", 1e-4, 2)]])
def test_error_penalty_must_be_a_mapping(penalty):
    with pytest.raises(ConfigError, match=rf"^error_penalty = {re.escape(repr(penalty))} is not allowed; allowed: a mapping"):
        QATConfig(error_penalty=penalty)


@pytest.mark.parametrize("lam", [-1e-4, "0.1", True, float("nan")])
def test_error_penalty_lambda_must_be_a_non_negative_number(lam):
    with pytest.raises(ConfigError, match=rf"^error_penalty\['\*\.weight'\] = {re.escape(repr(lam))} is not allowed"):
        QATConfig(error_penalty={"*.weight": lam})


def test_error_penalty_accepts_ints_and_zero():
    cfg = QATConfig(error_penalty={"*.weight": 0, "fc.*": 2})
    assert dict(cfg.error_penalty) == {"*.weight": 0, "fc.*": 2}


@pytest.mark.parametrize("kwargs, field", [
    ({"epochs": -1}, "epochs"), ({"epochs": 1.5}, "epochs"), ({"batch_size": 0}, "batch_size"),
    ({"lr": -0.1}, "lr"), ({"lr": "1e-3"}, "lr"), ({"momentum": 1.5}, "momentum"), ({"distill": 2.0}, "distill"),
    ({"temperature": 0.0}, "temperature"), ({"calib_batches": 0}, "calib_batches"), ({"seed": True}, "seed"),
    ({"scale_lr": -1.0}, "scale_lr"), ({"bn_freeze_epoch": -1}, "bn_freeze_epoch"), ({"warmup_epochs": -0.5}, "warmup_epochs"),
])
def test_train_config_numbers_out_of_range(kwargs, field):
    value = kwargs[field]
    with pytest.raises(ConfigError, match=rf"^{field} = {re.escape(repr(value))} is not allowed"):
        TrainConfig(**kwargs)


def test_train_config_choices():
    with pytest.raises(ConfigError, match=r"^optimizer = 'adam' is not allowed; allowed: adamw, sgd"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ConfigError, match=r"^device = 'tpu' is not allowed"):
        TrainConfig(device="tpu")
    assert TrainConfig(device="cuda:1").device == "cuda:1"


# ---- from dicts -----------------------------------------------------------------------------------
def test_unknown_qat_key_is_named_with_the_allowed_keys():
    allowed = ", ".join(f.name for f in dataclasses.fields(QATConfig))
    with pytest.raises(ConfigError, match=rf"^qat key = 'wbits' is not allowed; allowed: {re.escape(allowed)}\."):
        qat_config_from_dict({"wbits": 4})


def test_unknown_train_key_is_named_with_the_allowed_keys():
    with pytest.raises(ConfigError, match=r"^train key = 'epoch' is not allowed; allowed: epochs, batch_size, lr, "):
        train_config_from_dict({"epoch": 3})


def test_the_first_unknown_key_in_sorted_order_is_named():
    with pytest.raises(ConfigError, match=r"^qat key = 'aaa'"):
        qat_config_from_dict({"zzz": 1, "aaa": 2, "weight_bits": 4})


@pytest.mark.parametrize("key, value, expected", [
    ("progress", "yes", r"^train\.progress = 'yes' is not allowed; allowed: true or false"),
    ("progress", 1, r"^train\.progress = 1 is not allowed; allowed: true or false"),
    ("optimizer", 3, r"^train\.optimizer = 3 is not allowed; allowed: a string"),
    ("device", None, r"^train\.device = None is not allowed; allowed: a string"),
    ("epochs", "10", r"^epochs = '10' is not allowed"),
    ("lr", "fast", r"^lr = 'fast' is not allowed"),
])
def test_train_dict_type_errors(key, value, expected):
    with pytest.raises(ConfigError, match=expected):
        train_config_from_dict({key: value})


@pytest.mark.parametrize("data, expected", [
    ({"per_channel": "yes"}, r"^qat\.per_channel = 'yes' is not allowed; allowed: true or false"),
    ({"power_of_two_scales": 1}, r"^qat\.power_of_two_scales = 1 is not allowed; allowed: true or false"),
    ({"exact_multipliers": "on"}, r"^qat\.exact_multipliers = 'on' is not allowed; allowed: true or false"),
    ({"exact_adds": 1}, r"^qat\.exact_adds = 1 is not allowed; allowed: true or false"),
    ({"reduce_range": 0}, r"^qat\.reduce_range = 0 is not allowed; allowed: true or false"),
    ({"exact_multipliers": True, "power_of_two_scales": True},
     r"^exact_multipliers = True is not allowed; allowed: False with power_of_two_scales .*Fix: set one of"),
    ({"weight_init": 1}, r"^qat\.weight_init = 1 is not allowed; allowed: a string"),
    ({"weight_bits": "8"}, r"^weight_bits = '8' is not allowed"),
    ({"rules": 5}, r"^rules = 5 is not allowed; allowed: a list of layer rules"),
    ({"rules": [5]}, r"^rules\[\] = 5 is not allowed; allowed: a mapping of LayerRule fields"),
    ({"rules": [{"pattern": "fc", "bits": 4}]}, r"^rules\[\] key = 'bits' is not allowed; allowed: pattern, weight_bits, act_bits, per_channel, skip"),
    ({"rules": [{"pattern": "fc", "skip": "no"}]}, r"^rules\[\]\.skip = 'no' is not allowed; allowed: true or false"),
    ({"rules": [{"weight_bits": 4}]}, r"^rules\[\]: .*missing 1 required keyword-only argument: 'pattern'"),
])
def test_qat_dict_type_errors(data, expected):
    with pytest.raises(ConfigError, match=expected):
        qat_config_from_dict(data)


@pytest.mark.parametrize("data", [[("epochs", 1)], "epochs: 1", None, 3])
def test_dict_loader_needs_a_mapping(data):
    with pytest.raises(ConfigError, match=r"^train = .* is not allowed; allowed: a mapping of TrainConfig fields"):
        train_config_from_dict(data)


def test_ints_are_accepted_for_floats():
    cfg = train_config_from_dict({"lr": 1, "weight_decay": 0, "warmup_epochs": 2, "scale_lr": 3, "temperature": 4})
    for name, value in (("lr", 1.0), ("weight_decay", 0.0), ("warmup_epochs", 2.0), ("scale_lr", 3.0), ("temperature", 4.0)):
        assert type(getattr(cfg, name)) is float and getattr(cfg, name) == value


def test_bools_are_not_accepted_as_numbers():
    with pytest.raises(ConfigError, match=r"^lr = True is not allowed"):
        train_config_from_dict({"lr": True})


def test_rules_as_a_list_of_dicts():
    cfg = qat_config_from_dict({
        "weight_bits": 4,
        "first_last_bits": None,
        "rules": [{"pattern": "layer1.*", "weight_bits": 2}, {"pattern": "Linear", "skip": True, "per_channel": False}],
    })
    assert cfg.rules == (LayerRule(pattern="layer1.*", weight_bits=2), LayerRule(pattern="Linear", skip=True, per_channel=False))
    assert isinstance(cfg.rules, tuple)
    assert cfg.first_last_bits is None and cfg.weight_bits == 4


def test_rules_may_mix_layer_rules_and_dicts_in_code():
    cfg = QATConfig(rules=[LayerRule(pattern="fc"), {"pattern": "conv*", "act_bits": 6}])
    assert cfg.rules == (LayerRule(pattern="fc"), LayerRule(pattern="conv*", act_bits=6))


def test_dict_round_trip_through_to_dict():
    cfg = QATConfig(weight_bits=4, rules=(LayerRule(pattern="fc", weight_bits=8),), error_penalty={"*.weight": 1e-4})
    assert qat_config_from_dict(to_dict(cfg)) == cfg
    tcfg = TrainConfig(epochs=3, lr=0.01, optimizer="sgd", bn_freeze_epoch=2, progress=False)
    assert train_config_from_dict(to_dict(tcfg)) == tcfg


def test_rule_per_channel_must_be_a_bool():
    with pytest.raises(ConfigError, match=r"per_channel"):
        qat_config_from_dict({"rules": [{"pattern": "fc", "per_channel": "yes"}]})


# ---- frozen ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("config, field, value", [
    (QATConfig(), "weight_bits", 4), (TrainConfig(), "lr", 0.1), (LayerRule(pattern="fc"), "skip", True),
    (QuantSpec(), "bits", 4), (QATConfig(), "rules", ()),
])
def test_configs_are_frozen(config, field, value):
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, field, value)


def test_rules_are_stored_as_an_immutable_tuple():
    cfg = QATConfig(rules=[{"pattern": "fc"}])
    assert isinstance(cfg.rules, tuple)
    with pytest.raises(AttributeError):
        cfg.rules.append(LayerRule(pattern="x"))  # type: ignore[attr-defined]


def test_error_penalty_is_copied_from_the_callers_dict():
    penalty = {"*.weight": 1e-4}
    cfg = QATConfig(error_penalty=penalty)
    penalty["*.weight"] = -1.0
    assert dict(cfg.error_penalty) == {"*.weight": 1e-4}


def test_error_penalty_of_a_frozen_config_cannot_be_mutated():
    cfg = QATConfig(error_penalty={"*.weight": 1e-4})
    with pytest.raises(TypeError):
        cfg.error_penalty["*.weight"] = -1.0  # type: ignore[index]
    hash(cfg)


# ---- YAML -----------------------------------------------------------------------------------------
def test_load_yaml_reads_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("qat:\n  weight_bits: 4\n  rules:\n    - {pattern: 'layer1.*', weight_bits: 2}\ntrain:\n  lr: 1\n")
    data = load_yaml(path)
    assert data == {"qat": {"weight_bits": 4, "rules": [{"pattern": "layer1.*", "weight_bits": 2}]}, "train": {"lr": 1}}
    assert qat_config_from_dict(data["qat"]).rules[0] == LayerRule(pattern="layer1.*", weight_bits=2)
    assert train_config_from_dict(data["train"]).lr == 1.0


def test_load_yaml_empty_file_is_an_empty_mapping(tmp_path):
    (tmp_path / "e.yaml").write_text("")
    assert load_yaml(tmp_path / "e.yaml") == {}


def test_load_yaml_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"^--config = {re.escape(repr(str(missing)))} is not allowed; allowed: an existing YAML file"):
        load_yaml(missing)


def test_load_yaml_directory_is_not_a_file(tmp_path):
    with pytest.raises(ConfigError, match=r"allowed: an existing YAML file"):
        load_yaml(tmp_path)


@pytest.mark.parametrize("text", ["a: [1, 2\n", "a: b: c\n", "\tkey: 1\n"])
def test_load_yaml_invalid_yaml(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^--config {re.escape(repr(str(path)))} is not valid YAML \(.+\)\. Fix: correct the file$"):
        load_yaml(path)


def test_load_yaml_binary_file(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage\x80")
    with pytest.raises(ConfigError, match=r"is not valid YAML"):
        load_yaml(path)


@pytest.mark.parametrize("text, kind", [("- 1\n- 2\n", "list"), ("just a string\n", "str"), ("42\n", "int")])
def test_load_yaml_top_level_must_be_a_mapping(tmp_path, text, kind):
    path = tmp_path / "top.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^--config content = '{kind}' is not allowed; allowed: a mapping of options"):
        load_yaml(path)


@pytest.mark.parametrize("template", [
    'qat: !!python/object/apply:os.system ["touch {marker}"]\n',
    '!!python/object/apply:os.system ["touch {marker}"]\n',
    'x: !!python/object/new:subprocess.Popen [["touch", "{marker}"]]\n',
])
def test_load_yaml_never_constructs_python_objects(tmp_path, template):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.yaml"
    path.write_text(template.format(marker=marker))
    with pytest.raises(ConfigError, match=r"is not valid YAML \(could not determine a constructor for the tag"):
        load_yaml(path)
    assert not marker.exists()


def test_qat_config_round_trips_through_plain_data():
    cfg = QATConfig(weight_bits=4, error_penalty={"*.weight": 1e-4}, rules=[{"pattern": "fc", "weight_bits": 8}])
    assert qat_config_from_dict(to_dict(cfg)) == cfg
    assert dict(cfg.error_penalty) == {"*.weight": 1e-4}
