"""Small data builders shared by tests (not fixtures: plain functions)."""

from __future__ import annotations

import pandas as pd

from pipelines.config import BreastCancerSource
from pipelines.sources.breast_cancer import BreastCancerReader


def breast_cancer_frame(n: int = 40, seed: int = 5) -> pd.DataFrame:
    """Rows in the shape of a hospital export: identifiers, measurements, diagnosis."""
    reader = BreastCancerReader(BreastCancerSource(kind="builtin_breast_cancer", seed=seed, nights=1))
    return reader.full_table().head(n).reset_index(drop=True)
