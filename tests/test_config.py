"""params.yaml is one typed config: every mistake names its key."""

from __future__ import annotations

import pytest
import yaml

from conftest import ROOT, image_params, profile, tabular_params
from pipelines.config import load_params, parse_params
from pipelines.errors import ConfigError


def test_both_shipped_profiles_load():
    image = load_params(ROOT / "params.yaml")
    tabular = load_params(ROOT / "profiles" / "breast_cancer.yaml")
    assert image.model.modality == "image" and image.source.kind == "synthetic_cxr"
    assert tabular.model.modality == "tabular" and len(tabular.tabular.features) == 30
    assert image.digest() != tabular.digest()
    assert image.digest() == load_params(ROOT / "params.yaml").digest()


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda p: p["preprocess"].update(shard_sise=3), "preprocess.shard_sise: unknown key"),
        (lambda p: p.update(trainig={}), "trainig: unknown key"),
        (lambda p: p["preprocess"].pop("seed"), "preprocess.seed: missing key"),
        (lambda p: p.pop("validate"), "validate: missing key"),
        (lambda p: p["source"].update(nights="many"), "source.nights: Input should be a valid integer"),
        (lambda p: p["source"].update(images_per_night=-4), "source.images_per_night: Input should be greater than or equal to 1"),
        (lambda p: p["source"].update(kind="ftp"), "source: Input tag 'ftp' found using 'kind' does not match"),
        (lambda p: p["clean"]["image"].update(channels=2), "clean.image.channels: Input should be 1 or 3"),
        (lambda p: p["model"].update(positive_class="COVID"), "positive_class 'COVID' is not one of classes"),
        (lambda p: p["clean"]["label_aliases"].update(covid="COVID"), "clean.label_aliases.covid maps to 'COVID'"),
        (lambda p: p["preprocess"].update(test_fraction=0.6, validation_fraction=0.5), "must be below 1"),
        (lambda p: p["preprocess"].update(image_size=None), "preprocess.image_size is required"),
        (lambda p: p["schedule"].update(cron="every night"), "schedule.cron: Value error, expected five cron fields"),
        (lambda p: p["schedule"].update(cron="0 2 * *"), "schedule.cron: Value error, expected five cron fields"),
        (lambda p: p["schedule"].update(timezone="Mars/Olympus"), "schedule.timezone: Value error, unknown time zone 'Mars/Olympus'"),
        (lambda p: p.pop("schedule"), "schedule: missing key"),
        (lambda p: p["evaluate"].update(subgroups=["sex", "ward"]),
         "evaluate.subgroups names 'ward', which the image metadata does not give (sex, age_band, view, site)"),
    ],
)
def test_mistakes_name_the_key(mutate, expected):
    params = profile()
    mutate(params)
    message = refusal(params)
    assert expected in message
    assert message.startswith("params.yaml: invalid params")


def refusal(params: dict) -> str:
    """The ConfigError's message for params that must be refused."""
    with pytest.raises(ConfigError) as error:
        parse_params(params, origin="params.yaml")
    return str(error.value)


def test_several_mistakes_are_all_reported():
    params = tabular_params()
    params["tabular"]["features"]["mean_radius"]["dtype"] = "decimal"
    params["deid"]["columns"]["mrn"] = "encrypt"
    with pytest.raises(ConfigError) as error:
        parse_params(params)
    message = str(error.value)
    assert "tabular.features.mean_radius.dtype" in message
    assert "deid.columns.mrn" in message


def test_tabular_source_with_image_model_is_refused():
    params = image_params(kind="csv", path="x.csv")
    with pytest.raises(ConfigError, match="source.kind 'csv' gives tables, but model.modality is image"):
        parse_params(params)


def test_sql_source_needs_exactly_one_of_table_or_query():
    params = tabular_params(kind="sql", url="sqlite:///x.db", table="cases", query="select 1")
    with pytest.raises(ConfigError, match="exactly one of source.table or source.query"):
        parse_params(params)


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: params file not found"):
        load_params(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml, line 2, column 1: not valid YAML: expected .*check the brackets"):
        load_params(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_params(listed)


def _age_feature(p):
    p["tabular"]["features"]["age"] = {"dtype": "int", "min": 0, "max": 120}


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (_age_feature, "tabular.features uses 'age', but deid.columns.age is 'age_band': the column would reach "
                       "the data with its raw, identifying values. Keep it under one of the two: "
                       "`deid.columns.age: age` keeps it as a number (whole years, ages over 89 become 90)"),
        (lambda p: p["tabular"]["subgroups"].append("mrn"), "tabular.subgroups uses 'mrn', but deid.columns.mrn is "
                                                             "'pseudonymize'"),
        (lambda p: p["tabular"].update(label="birth_date"), "tabular.label uses 'birth_date', but deid.columns."
                                                             "birth_date is 'drop'"),
        (lambda p: p["deid"]["columns"].pop("age"), "tabular.subgroups names 'age_band', but no deid.columns rule "
                                                     "is 'age_band' to make it"),
        (lambda p: p["evaluate"].update(subgroups=["age_band", "ward"]),
         "evaluate.subgroups names 'ward', which tabular.subgroups does not give (age_band, site)"),
    ],
)
def test_an_identifier_rule_holds_wherever_the_column_is_used(mutate, expected):
    params = tabular_params()
    mutate(params)
    assert expected in refusal(params)


def test_an_age_rule_that_keeps_a_safe_value_may_feed_a_feature():
    params = tabular_params()
    params["deid"]["columns"]["age"] = "age"
    _age_feature(params)
    params["tabular"]["subgroups"] = ["site"]
    params["evaluate"]["subgroups"] = ["site"]
    assert "age" in parse_params(params).tabular.features
