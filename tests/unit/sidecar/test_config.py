import pytest

from saber_sidecar.config import ConfigError, SidecarConfig, load_config, paper_config, parse_config

GOOD = """
classes:
  - name: interactive
    deadline_seconds: 1.5
    ttft_seconds: 0.3
    output_tokens: 64
    on_miss: reject
    model_aliases: [coder-fast]
  - name: batch
    deadline_seconds: 30
default_class: batch
scheduling:
  policy: saber
"""


def test_parse_good_config():
    cfg = parse_config(GOOD)
    assert cfg.get_class("interactive").on_miss == "reject"
    assert cfg.class_for_model("coder-fast").name == "interactive"
    assert cfg.class_for_model("other") is None
    assert cfg.scheduling.speed_model.form == "usl"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("classes: [", "not valid YAML"),
        ("- a\n- b", "expected a mapping"),
        ("classes: []\ndefault_class: x", "classes"),
        ("classes: [{name: a, deadline_seconds: 1}]\ndefault_class: b", "default_class 'b' is not one of"),
        ("classes: [{name: a, deadline_seconds: -1}]\ndefault_class: a", "deadline_seconds"),
        ("classes: [{name: a, deadline_seconds: 1}, {name: a, deadline_seconds: 2}]\ndefault_class: a", "duplicate"),
        ("classes: [{name: A_B, deadline_seconds: 1}]\ndefault_class: A_B", "classes.0.name"),
        (
            "classes: [{name: a, deadline_seconds: 1}]\ndefault_class: a\n"
            "scheduling: {speed_model: {form: linear, params: [1, 2, 3]}}",
            "takes 2 params",
        ),
        ("classes: [{name: a, deadline_seconds: 1, color: red}]\ndefault_class: a", "color"),
    ],
)
def test_bad_config_says_what_is_wrong(text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_config(text)


def test_load_config_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def test_paper_config_round_trips():
    cfg = paper_config(policy="saber-paper")
    again = SidecarConfig.model_validate(cfg.model_dump())
    assert again == cfg
    assert [c.deadline_seconds for c in cfg.classes] == [1.0, 1.0, 8.0, 12.0]


def test_a_removed_saber_setting_says_it_is_no_longer_one():
    text = ("classes: [{name: a, deadline_seconds: 1}]\ndefault_class: a\n"
            "scheduling: {saber: {light_load: 0.5, initial_prefill_seconds_per_token: 0.001, kv_cache_high: 0.9}}\n")
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    msg = str(err.value)
    assert "light_load (lightLoad in a SaberService) is no longer a setting" in msg and "remove it" in msg
    assert "initial_prefill_seconds_per_token (initialPrefillSecondsPerToken in a SaberService) is no longer" in msg
    assert "engine_profile" in msg
    assert "kv_cache_high" not in msg  # still a setting
    cfg = parse_config(text.replace("light_load: 0.5, initial_prefill_seconds_per_token: 0.001, ", ""))
    assert cfg.scheduling.saber.kv_cache_high == 0.9


def test_saber_settings_are_few_and_each_documented_with_its_trade():
    from pathlib import Path

    from saber_sidecar.config import REMOVED_SABER_SETTINGS, SaberSchedulingConfig
    from saber_sidecar.policy.saber_tuning import Tuning

    fields = SaberSchedulingConfig.model_fields
    assert len(fields) <= 6
    doc = (Path(__file__).resolve().parents[3] / "docs" / "SIDECAR.md").read_text()
    table = doc.split("## saber's settings")[1].split("\n## ")[0]
    for name, field in fields.items():
        assert f"| `{name}` | {field.default} |" in table, name
        assert "Raising it" in (field.description or "") or "Lowering it" in (field.description or ""), name
    # Every removed setting is an internal constant now (or, the prefill prior, the engine profile's).
    assert not set(REMOVED_SABER_SETTINGS) & set(fields)
    assert set(REMOVED_SABER_SETTINGS) - set(Tuning.__dataclass_fields__) == {"initial_prefill_seconds_per_token"}
