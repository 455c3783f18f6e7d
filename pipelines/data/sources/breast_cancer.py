"""Built-in source: the Wisconsin diagnostic breast cancer data shipped by scikit-learn.

The 569 cases are shuffled with the seed and released in ``nights`` batches, as if they arrived
over several nights. Realistic but fake identifier columns (name, MRN, birth date, phone, e-mail,
address, exam date, exact age) are added so that the tabular de-identification has real work to
do; the measurements and diagnoses are the public data set's. No row describes a real person's
identity.
"""

from __future__ import annotations

import re
from datetime import date, timedelta
from typing import Iterator

import numpy as np
import pandas as pd

from pipelines.config import BreastCancerSource
from pipelines.data.sources.base import SourceState, TableChunk

FIRST_NAMES = ["Ada", "Grace", "Maria", "Lena", "Sofia", "Nora", "Ines", "Mira", "Julia", "Hana"]
LAST_NAMES = ["Okafor", "Lindqvist", "Moreau", "Tanaka", "Novak", "Alvarez", "Brennan", "Kowalski"]
STREETS = ["Elm Street", "Harbour Road", "Mill Lane", "Station Avenue", "Church Walk"]
SITES = ["site-north", "site-south", "site-east"]
FIRST_EXAM = date(2024, 1, 8)


class BreastCancerReader:
    """Releases night k of the shuffled Wisconsin data, k = nights already released + 1."""

    name = "builtin_breast_cancer"

    def __init__(self, spec: BreastCancerSource):
        self.spec = spec

    def chunks(self, state: SourceState) -> Iterator[TableChunk]:
        night = state.nights_released + 1
        if night > self.spec.nights:
            return
        yield self.night_chunk(night)

    def night_chunk(self, night: int) -> TableChunk:
        """The rows released on ``night`` (1-based), identifiers included."""
        table = self.full_table()
        parts = np.array_split(np.arange(len(table)), self.spec.nights)
        rows = table.iloc[parts[night - 1]].reset_index(drop=True)
        return TableChunk(frame=rows, origin=f"night-{night:02d}", night=night)

    def full_table(self) -> pd.DataFrame:
        """All cases with fake identifiers, in the seeded release order."""
        from sklearn.datasets import load_breast_cancer

        data = load_breast_cancer(as_frame=True)
        features = data.data.rename(columns=snake_case)
        diagnosis = data.target.map({0: "malignant", 1: "benign"})
        rng = np.random.default_rng(self.spec.seed)
        order = rng.permutation(len(features))
        features = features.iloc[order].reset_index(drop=True)
        diagnosis = diagnosis.iloc[order].reset_index(drop=True)
        identifiers = fake_identifiers(rng, len(features))
        return pd.concat([identifiers, features, diagnosis.rename("diagnosis")], axis=1)


def snake_case(name: str) -> str:
    """``mean radius`` -> ``mean_radius``."""
    return re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower()


def fake_identifiers(rng: np.random.Generator, n: int) -> pd.DataFrame:
    """Fake but realistic identifier columns; some patients have two exams."""
    patients = max(1, int(n * 0.85))
    patient_of_row = rng.integers(0, patients, size=n)
    first = rng.choice(FIRST_NAMES, size=patients)
    last = rng.choice(LAST_NAMES, size=patients)
    born = [date(1930, 1, 1) + timedelta(days=int(d)) for d in rng.integers(0, 365 * 70, size=patients)]
    exam = [FIRST_EXAM + timedelta(days=int(d)) for d in rng.integers(0, 700, size=n)]
    rows = []
    for row, patient in enumerate(patient_of_row):
        birth = born[patient]
        age = exam[row].year - birth.year - ((exam[row].month, exam[row].day) < (birth.month, birth.day))
        rows.append(
            {
                "patient_name": f"{last[patient].upper()}^{first[patient]}",
                "mrn": f"MRN{7100000 + patient:08d}",
                "birth_date": birth.isoformat(),
                "phone": f"+1-555-{100 + patient % 900:03d}-{patient % 10000:04d}",
                "email": f"{first[patient].lower()}.{last[patient].lower()}{patient}@example.org",
                "address": f"{1 + patient % 200} {STREETS[patient % len(STREETS)]}, Springfield",
                "exam_date": exam[row].isoformat(),
                "age": age,
                "site": SITES[patient % len(SITES)],
            }
        )
    return pd.DataFrame(rows)
