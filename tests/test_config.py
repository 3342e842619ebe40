"""The one typed config: validation, API args, infotext round trip."""

import pytest

from ela_ext.config import API_FIELDS, FIELD_HELP, ConfigError, ElaConfig, replace


def test_defaults_are_off_and_valid():
    config = ElaConfig().validated()
    assert config.enabled is False and config.entities == ""
    assert set(FIELD_HELP) == set(API_FIELDS)


def test_two_args_make_a_complete_request():
    config = ElaConfig.from_args([True, "cat | frog"])
    assert config.enabled and config.entities == "cat | frog"
    assert config.as_args()[2:] == ElaConfig().as_args()[2:]
    assert API_FIELDS[:2] == ("enabled", "entities")


@pytest.mark.parametrize("changes, field", [
    ({"lambda_weight": 1.5}, "lambda_weight"),
    ({"window_start": 0.5, "window_end": 0.4}, "window_start"),
    ({"max_iterations": 0}, "max_iterations"),
    ({"step_size": -1.0}, "step_size"),
    ({"objective": "magic"}, "objective"),
    ({"layers": "everything"}, "layers"),
    ({"binarization": "kmeans"}, "binarization"),
    ({"loss_threshold": float("nan")}, "loss_threshold"),
])
def test_validation_names_the_bad_field_and_its_range(changes, field):
    with pytest.raises(ConfigError, match=field):
        replace(ElaConfig(), **changes)


def test_api_values_are_coerced_or_named():
    config = ElaConfig.from_mapping({"enabled": "true", "max_iterations": 7.0, "step_size": "0.2"})
    assert config.enabled is True and config.max_iterations == 7 and config.step_size == 0.2
    with pytest.raises(ConfigError, match="max_iterations"):
        ElaConfig.from_mapping({"max_iterations": 2.5})
    for not_an_int in ("inf", "1e400", "nan", "abc", None):
        with pytest.raises(ConfigError, match="max_iterations"):
            ElaConfig.from_mapping({"max_iterations": not_an_int})
    with pytest.raises(ConfigError, match="bogus"):
        ElaConfig.from_mapping({"bogus": 1})
    with pytest.raises(ConfigError, match="at most"):
        ElaConfig.from_args([True] * (len(API_FIELDS) + 1))


def test_infotext_round_trip_without_characters_the_webui_would_quote():
    config = replace(ElaConfig(enabled=True), entities="black cat | green frog", lambda_weight=0.45,
                     window_end=0.4, max_iterations=8, objective="iou", layers="up_all", binarization="mean")
    text = config.to_infotext()
    assert "," not in text and ":" not in text and "\n" not in text
    back = ElaConfig.from_infotext(text)
    assert back == replace(config, save_masks=False)
    with pytest.raises(ConfigError, match="unreadable"):
        ElaConfig.from_infotext("lambda=0.3;nonsense")


def test_auto_objective_resolves_per_denoiser_family_and_round_trips():
    config = ElaConfig(enabled=True)
    assert config.objective == "auto"
    assert config.for_denoiser(joint=False).objective == "separate_enhance"
    assert config.for_denoiser(joint=True).objective == "attend_excite_paper"
    chosen = replace(config, objective="iou")
    assert chosen.for_denoiser(joint=True) is chosen  # a named objective is kept on every family
    assert ElaConfig.from_infotext(config.to_infotext()).objective == "auto"
    assert ElaConfig.from_infotext("objective=separate_enhance").objective == "separate_enhance"  # older images


def test_presets_are_valid_settings():
    from ela_ext.config import PRESETS

    assert PRESETS["defaults"] == {}
    for values in PRESETS.values():
        assert replace(ElaConfig(), **values).validated()
    assert replace(ElaConfig(), **PRESETS["fast"]).max_iterations == 1
