"""Collect and clean of tabular sources: built-in, CSV/Parquet, SQL (SQLite and PostgreSQL)."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import load, make_workspace, tabular_params
from pipelines import clean, collect
from pipelines.data import manifest
from pipelines.errors import DeidentificationError, SourceError
from tests_support import POSTGRES_URL, breast_cancer_frame


breast_cancer_rows = breast_cancer_frame


def csv_workspace(tmp_path, frame: pd.DataFrame, name="ws"):
    path = tmp_path / f"{name}.csv"
    frame.to_csv(path, index=False)
    return make_workspace(tmp_path, tabular_params(kind="csv", path=str(path)), name), path


def quarantine(layout) -> pd.DataFrame:
    return pd.read_csv(layout.quarantine_csv, keep_default_na=False)


def test_builtin_source_releases_one_night_per_collect_and_then_nothing(tmp_path):
    layout = make_workspace(tmp_path, tabular_params())
    params = load(layout)
    sizes = [collect.run(params, layout).stored for _ in range(4)]
    assert sum(sizes) == 569 and all(size > 100 for size in sizes)
    dvc_file = layout.raw_record
    before = dvc_file.read_text()
    batches = sorted(p.name for p in layout.batches.iterdir())
    assert len([name for name in batches if name.endswith(".dvc")]) == 4  # DVC records each batch alone
    again = collect.run(params, layout)
    assert not again.changed and again.stored == 0
    assert dvc_file.read_text() == before
    assert sorted(p.name for p in layout.batches.iterdir()) == batches


def test_csv_collect_is_incremental_and_deidentified(tmp_path):
    rows = breast_cancer_rows(40)
    layout, path = csv_workspace(tmp_path, rows.head(30))
    params = load(layout)
    first = collect.run(params, layout)
    assert (first.stored, first.rejected, first.duplicates) == (30, 0, 0)
    assert not collect.run(params, layout).changed  # same file, nothing new
    rows.to_csv(path, index=False)  # ten more rows arrive in the export
    second = collect.run(params, layout)
    assert (second.stored, second.already_collected) == (10, 30)
    stored = pd.concat(pd.read_parquet(p) for p in layout.batches.glob("*/rows.parquet"))
    for column in ("patient_name", "mrn", "birth_date", "phone", "email", "address", "exam_date", "age"):
        assert column not in stored.columns
    assert stored["patient_id"].str.fullmatch(r"pt-[0-9a-f]{16}").all()
    assert set(stored["study_year"].dropna()) <= {2024, 2025}
    assert stored["age_band"].str.fullmatch(r"\d0-\d9|90\+").all()
    # the same MRN gives the same pseudonym; the MRN itself is nowhere
    assert stored.groupby("patient_id").size().max() >= 1
    assert not stored.astype(str).apply(lambda col: col.str.contains("MRN")).any().any()


def test_ages_over_89_become_90_plus(tmp_path):
    rows = breast_cancer_rows(6)
    rows["age"] = [34, 89, 90, 97, 104, 61]
    layout, _ = csv_workspace(tmp_path, rows)
    collect.run(load(layout), layout)
    stored = pd.read_parquet(next(layout.batches.glob("*/rows.parquet")))
    assert list(stored["age_band"]) == ["30-39", "80-89", "90+", "90+", "90+", "60-69"]
    assert "age" not in stored.columns


def test_an_age_kept_as_a_feature_is_capped_there_too(tmp_path):
    """`deid.columns.age: age` keeps the age as a feature, Safe Harbor capped (over 89 -> 90)."""
    rows = breast_cancer_rows(6)
    rows["age"] = [34, 89, 90, 95, 102, 61]
    path = tmp_path / "ages.csv"
    rows.to_csv(path, index=False)
    params = tabular_params(kind="csv", path=str(path))
    params["deid"]["columns"]["age"] = "age"
    params["tabular"]["features"]["age"] = {"dtype": "int", "min": 0, "max": 120}
    params["tabular"]["subgroups"] = ["site"]
    params["evaluate"]["subgroups"] = ["site"]
    layout = make_workspace(tmp_path, params)
    collect.run(load(layout), layout)
    stored = pd.read_parquet(next(layout.batches.glob("*/rows.parquet")))
    assert list(stored["age"]) == [34, 89, 90, 90, 90, 61]


def test_undeclared_identifier_column_is_refused_and_nothing_written(tmp_path):
    rows = breast_cancer_rows(10)
    layout, path = csv_workspace(tmp_path, rows)
    collect.run(load(layout), layout)
    before = (layout.raw_record).read_text()
    rows["ssn"] = "123-45-6789"
    rows.to_csv(path, index=False)
    with pytest.raises(DeidentificationError) as error:
        collect.run(load(layout), layout)
    message = str(error.value)
    assert "'ssn' not declared in params" in message and str(path) in message
    assert "look(s) like an identifier" in message
    assert (layout.raw_record).read_text() == before
    assert len([path for path in layout.batches.iterdir() if path.is_dir()]) == 1
    assert not any(layout.tmp.iterdir())


def test_missing_columns_name_the_file_and_columns(tmp_path):
    rows = breast_cancer_rows(10).drop(columns=["mean_radius", "diagnosis"])
    layout, path = csv_workspace(tmp_path, rows)
    with pytest.raises(SourceError) as error:
        collect.run(load(layout), layout)
    assert f"{path}: missing column(s) 'mean_radius', 'diagnosis'" in str(error.value)
    assert not layout.batches.exists()


def test_a_subgroup_the_source_does_not_have_is_an_error_not_unknown(tmp_path):
    layout, path = csv_workspace(tmp_path, breast_cancer_rows(10).drop(columns=["site", "age"]))
    with pytest.raises(SourceError) as error:
        collect.run(load(layout), layout)
    assert f"{path}: missing column(s) 'site', 'age'" in str(error.value)
    assert "tabular.subgroups, or the source of the age_band subgroup" in " ".join(str(error.value).split())
    assert not layout.batches.exists()


def test_bad_rows_are_quarantined_with_row_and_field(tmp_path):
    rows = breast_cancer_rows(12).astype({"mean_radius": object, "mean_area": object})
    rows.loc[1, "mean_radius"] = "abc"  # wrong type
    rows.loc[2, "mean_area"] = "inf"  # infinite
    rows.loc[3, "mean_texture"] = float("nan")  # missing: kept, gated by validate's null rate
    rows.loc[4, "diagnosis"] = "borderline"  # unknown label
    rows.loc[5, "diagnosis"] = "M"  # alias of malignant
    rows.loc[6, "mean_radius"] = "Jane Doe"  # free text in a number column: never echoed
    rows = pd.concat([rows, rows.iloc[[7]]], ignore_index=True)  # exact duplicate row
    layout, path = csv_workspace(tmp_path, rows)
    result = collect.run(load(layout), layout)
    assert (result.stored, result.duplicates) == (12, 1)
    outcome = clean.run(load(layout), layout)
    table = quarantine(layout).set_index("item")
    reasons = table["reason"].to_dict()
    assert reasons[f"{path}#row=2"] == "field 'mean_radius' is not a number (got text of 3 characters)"
    assert reasons[f"{path}#row=3"] == "field 'mean_area' is infinite (inf)"
    assert reasons[f"{path}#row=5"].startswith("unknown label 'borderline' (expected one of benign, malignant")
    assert reasons[f"{path}#row=7"] == "field 'mean_radius' is not a number (got text of 8 characters)"
    assert reasons[f"{path}#row=13"] == f"duplicate row: same values as {path}#row=8"
    assert set(table["source"]) == {f"csv:{path}"}
    assert outcome.accepted == 8 and outcome.quarantined == 5
    records = pd.read_parquet(layout.clean_records)
    assert records["mean_texture"].isna().sum() == 1
    assert "malignant" in set(records.loc[records["source_ref"] == f"{path}#row=6", "label"])
    assert "Jane" not in layout.quarantine_csv.read_text()
    # every collected item is accounted for: accepted or quarantined
    intake = pd.read_parquet(layout.clean_intake)
    assert len(intake) == len(manifest.read(layout)) == 13
    assert intake["accepted"].sum() == len(records)


def test_whole_row_duplicates_across_batches_are_not_collected_twice(tmp_path):
    rows = breast_cancer_rows(5)
    layout, path = csv_workspace(tmp_path, rows)
    collect.run(load(layout), layout)
    pd.concat([rows, rows]).to_csv(path, index=False)
    result = collect.run(load(layout), layout)
    assert not result.changed and result.already_collected == 10


def test_parquet_folder_source(tmp_path):
    folder = tmp_path / "exports"
    folder.mkdir()
    rows = breast_cancer_rows(20)
    rows.head(8).to_parquet(folder / "a.parquet")
    rows.tail(12).to_parquet(folder / "b.parquet")
    layout = make_workspace(tmp_path, tabular_params(kind="parquet", path=str(folder)))
    assert collect.run(load(layout), layout).stored == 20


def test_empty_and_garbled_csv_files_are_clear_errors(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    layout = make_workspace(tmp_path, tabular_params(kind="csv", path=str(empty)))
    with pytest.raises(SourceError, match="empty.csv: file is empty"):
        collect.run(load(layout), layout)
    empty.write_bytes(b"\xff\xfe\x00garbage\x00\xff")
    with pytest.raises(SourceError, match="empty.csv: not UTF-8 text"):
        collect.run(load(layout), layout)


def _sql_roundtrip(tmp_path, url: str, table: str):
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    rows = breast_cancer_rows(25)
    with engine.begin() as connection:
        connection.execute(sa.text(f'DROP TABLE IF EXISTS "{table}"'))
    rows.to_sql(table, engine, index=False)
    engine.dispose()
    layout = make_workspace(tmp_path, tabular_params(kind="sql", url=url, table=table))
    first = collect.run(load(layout), layout)
    assert first.stored == 25
    assert not collect.run(load(layout), layout).changed
    query_layout = make_workspace(
        tmp_path, tabular_params(kind="sql", url=url, query=f'SELECT * FROM "{table}" WHERE mean_radius > 15'),
        name="wsq",
    )
    assert collect.run(load(query_layout), query_layout).stored == int((rows["mean_radius"] > 15).sum())
    return layout


def test_sqlite_table_and_query(tmp_path):
    _sql_roundtrip(tmp_path, f"sqlite:///{tmp_path / 'cases.db'}", "cases")


@pytest.mark.integration
def test_postgresql_table_and_query(tmp_path):
    _sql_roundtrip(tmp_path, POSTGRES_URL, f"medloop_cases_{tmp_path.name[-12:].replace('-', '_')}")


def test_unreachable_database_is_a_clear_error_without_password(tmp_path):
    url = "postgresql+psycopg2://reader:s3cret@127.0.0.1:1/clinic"
    layout = make_workspace(tmp_path, tabular_params(kind="sql", url=url, table="cases"))
    with pytest.raises(SourceError) as error:
        collect.run(load(layout), layout)
    message = str(error.value)
    assert "cannot reach the database" in message and "127.0.0.1:1/clinic" in message
    assert "s3cret" not in message
    assert not layout.batches.exists()


def test_a_row_repeated_in_a_second_file_of_the_same_batch_is_quarantined(tmp_path):
    folder = tmp_path / "exports"
    folder.mkdir()
    rows = breast_cancer_rows(10)
    rows.to_csv(folder / "a.csv", index=False)
    rows.iloc[[3]].to_csv(folder / "b.csv", index=False)
    layout = make_workspace(tmp_path, tabular_params(kind="csv", path=str(folder)))
    result = collect.run(load(layout), layout)
    assert (result.stored, result.duplicates, result.already_collected) == (10, 1, 0)
    clean.run(load(layout), layout)
    reasons = quarantine(layout).set_index("item")["reason"].to_dict()
    assert reasons[f"{folder / 'b.csv'}#row=1"] == f"duplicate row: same values as {folder / 'a.csv'}#row=4"


def test_int_feature_with_a_fraction_is_quarantined(tmp_path):
    rows = breast_cancer_rows(6)
    rows["mean_radius"] = [12, 14, 13.5, 11, 15, 16]
    path = tmp_path / "export.csv"
    rows.to_csv(path, index=False)
    params = tabular_params(kind="csv", path=str(path))
    params["tabular"]["features"]["mean_radius"]["dtype"] = "int"
    layout = make_workspace(tmp_path, params)
    collect.run(load(layout), layout)
    clean.run(load(layout), layout)
    reasons = quarantine(layout).set_index("item")["reason"].to_dict()
    assert reasons == {f"{path}#row=3": "field 'mean_radius' must be a whole number (got 13.5)"}
