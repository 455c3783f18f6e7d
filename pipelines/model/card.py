"""The model card (``reports/model_card.md``): what a model is for, what it was made from, how
well it does on the frozen test set, and where it may fail.

`render` is a pure function of the evaluation report, the params and the lineage; it writes no
dates or host names, so the card changes only when the model, the data or the code do.
"""

from __future__ import annotations

from pipelines.config import Params
from pipelines.model.metrics import PROPORTION_INTERVAL_METHOD
from pipelines.registry.tags import PREFIX
from pipelines.values import number

# Rows of the performance table: (key in metrics.json, label).
PERFORMANCE_ROWS = (
    ("auroc", "AUROC"),
    ("auprc", "AUPRC (average precision)"),
    ("sensitivity", "Sensitivity (recall)"),
    ("specificity", "Specificity"),
    ("ppv", "PPV (precision)"),
    ("npv", "NPV"),
    ("f1", "F1"),
    ("accuracy", "Accuracy"),
    ("brier", "Brier score (lower is better)"),
    ("ece", "Expected calibration error (lower is better)"),
    ("macro_auroc", "Macro AUROC (one-vs-rest, all classes)"),
)
SOURCE_DESCRIPTIONS = {
    "synthetic_cxr": "medloop's built-in generator of SYNTHETIC chest radiographs (not real patients)",
    "builtin_breast_cancer": "the Wisconsin diagnostic breast cancer data set shipped with scikit-learn "
                             "(released in nightly batches, with fake identifier columns)",
    "image_folder": "a folder of radiographs (JPEG, PNG, DICOM) sorted into class folders",
    "csv": "a CSV export of clinical measurements",
    "parquet": "a Parquet export of clinical measurements",
    "sql": "a database table or query of clinical measurements",
    "s3": "objects in an S3 bucket",
}
SMALL_TEST_SET = 200


def render(
    params: Params,
    report: dict,
    lineage: dict[str, str],
    data: dict,
    explanations: dict | None = None,
    trained: dict | None = None,
) -> str:
    """The model card as Markdown.

    Args:
        params: the resolved params.
        report: the content of reports/metrics.json.
        lineage: `pipelines.registry.tracking.lineage_tags` (git commit, DVC data hashes, params hash).
        data: data/processed/preprocess.json (split sizes and class counts).
        explanations: ``{"gradcam": [paths]}`` or ``{"permutation_importance": [rows]}``.
        trained: models/train.json.
    """
    explanations = explanations or {}
    trained = trained or {}
    model, source = params.model, params.source
    synthetic = source.kind == "synthetic_cxr"
    test, validation = report["test"], report["validation"]
    lines = [f"# Model card: {model.name}", ""]
    if synthetic:
        lines += [
            "> **SYNTHETIC DATA.** This model was trained and evaluated on generated images, not on "
            "real patients. Its figures say nothing about clinical performance.", "",
        ]

    lines += [
        "## Intended use", "",
        f"- A **screening aid** that flags likely **{model.positive_class}** "
        f"({model.modality} model, classes: {', '.join(model.classes)}) so that a clinician looks "
        f"at those cases first. It is **not a diagnosis**: every flagged and unflagged case still needs "
        f"a clinician's judgement.",
        f"- Trained on {SOURCE_DESCRIPTIONS.get(source.kind, source.kind)} (source kind `{source.kind}`).",
        "- Not intended for populations, devices or sites unlike those in the training data, for "
        "children unless they were represented, or for use without a clinician in the loop.",
        "",
        "## Model", "",
        f"- Architecture: `{trained.get('architecture', params.train.architecture)}`"
        + (f", {trained['parameters']:,} parameters" if trained.get("parameters") else ""),
        f"- MLflow run: `{report['run_id']}`",
        f"- Weights sha256: `{report.get('weights_sha256')}`",
        "",
        "## Data versions", "",
        "| what | version |", "| --- | --- |",
    ]
    lines += [f"| {key.removeprefix(PREFIX)} | `{value}` |" for key, value in sorted(lineage.items())]
    lines += [f"| frozen test set (sha256 of record ids) | `{report['frozen_test_set_sha256']}` |", ""]
    counts, class_counts = data.get("counts", {}), data.get("class_counts", {})
    if counts:
        lines += ["| split | items | " + " | ".join(model.classes) + " |",
                  "| --- | ---: | " + " | ".join("---:" for _ in model.classes) + " |"]
        for split in ("train", "validation", "test"):
            per_class = class_counts.get(split, {})
            lines.append(f"| {split} | {counts.get(split, 0)} | "
                         + " | ".join(str(per_class.get(c, 0)) for c in model.classes) + " |")
        lines.append("")
        lines.append("Splits are by patient (no patient is in two splits); the test set was frozen on "
                     "the first run and never changes.")
        lines.append("")

    calibrated = (report.get("calibration") or {}).get("method", "none") != "none"
    lines += [
        "## Operating threshold", "",
        f"An item is flagged {model.positive_class} when the model's {'calibrated ' if calibrated else ''}probability "
        f"of {model.positive_class} is at least **{report['operating_threshold']}**. The threshold was "
        f"chosen on the **validation** split (never the test set) as the highest threshold whose "
        f"validation sensitivity reaches the target of {params.evaluate.target_sensitivity:g} "
        f"(validation sensitivity reached: {number(validation.get('sensitivity'))}, specificity "
        f"{number(validation.get('specificity'))}).",
        "",
    ]
    lines += calibration_section(report.get("calibration"))
    lines += [
        f"## Performance on the frozen test set ({test['n']} items, {test['n_positive']} {model.positive_class})",
        "",
    ]
    if len(model.classes) > 2:
        lines += [f"Metrics are one-vs-rest for {model.positive_class} unless stated otherwise.", ""]
    lines += ["| metric | test | 95% interval | validation |", "| --- | ---: | --- | ---: |"]
    for key, label in PERFORMANCE_ROWS:
        if key not in test:
            continue
        interval = test.get(f"{key}_ci")
        shown = f"{number(interval[0])} - {number(interval[1])}" if interval else ""
        lines.append(f"| {label} | {number(test[key])} | {shown} | {number(validation.get(key))} |")
    lines += [
        "",
        f"Intervals (95%): AUROC by {params.evaluate.bootstrap_samples} bootstrap resamples of patients, "
        f"percentile method; sensitivity and specificity: {PROPORTION_INTERVAL_METHOD}. "
        f"Calibration: {params.evaluate.calibration_bins} equal-width bins.",
        "",
        "## Subgroups", "",
    ]
    small = params.promote.subgroup_min_count
    if report["subgroups"]:
        lines += ["| subgroup | value | n | positives | AUROC | sensitivity | specificity |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for column, values in sorted(report["subgroups"].items()):
            for value, row in sorted(values.items()):
                flag = " (small)" if row["n"] < small else ""
                lines.append(f"| {column} | {value}{flag} | {row['n']} | {row['n_positive']} | {number(row['auroc'])} "
                             f"| {number(row['sensitivity'])} | {number(row['specificity'])} |")
        lines += ["", f"Subgroups with fewer than {small} items are marked (small): their figures are "
                      f"reported but too uncertain to judge.", ""]
    else:
        lines += ["No subgroup columns were available in the data.", ""]

    if explanations.get("gradcam"):
        lines += ["## Explanations", "",
                  f"Grad-CAM heat maps of {len(explanations['gradcam'])} test images are in "
                  f"`reports/plots/gradcam/`. They show where the last convolutional layer's evidence "
                  f"lies for the actual class, not why; a model can look at the right place for the "
                  f"wrong reason (or at burned-in markers).", ""]
    importance = explanations.get("permutation_importance")
    if importance:
        top = ", ".join(f"{row['feature']} ({number(row['importance'])})" for row in importance[:5])
        lines += ["## Explanations", "",
                  f"Permutation importance (drop in test AUROC when a feature is shuffled): {top}. "
                  f"Correlated features share their importance, so a low value does not mean a "
                  f"feature is unused.", ""]

    lines += ["## Limitations", ""]
    lines += [f"- {item}" for item in limitations(params, report)]
    lines.append("")
    return "\n".join(lines)


def calibration_section(calibration: dict | None) -> list[str]:
    """The card's Calibration section: the method, and ECE and Brier score before and after."""
    if not calibration:
        return []
    lines = ["## Calibration", ""]
    if calibration.get("method", "none") == "none":
        lines.append("No post-hoc calibration (`train.calibration: none`): the probabilities are the network's own.")
    else:
        lines.append(f"The network's probabilities are calibrated by **{calibration['description']}**, fitted on "
                     f"the validation split after training. Every probability shown (here, by the service and "
                     f"in the drift reference) is calibrated. "
                     + ("Isotonic regression may tie cases the network told apart." if calibration.get("method") == "isotonic"
                        else "It keeps the order of the cases: it changes how sure the model says it is, not which "
                             "case ranks above which."))
    lines += ["", "| split | ECE before | ECE after | Brier before | Brier after |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for split in ("validation", "test"):
        row = calibration.get(split) or {}
        lines.append(f"| {split} | {number(row.get('ece_before'))} | {number(row.get('ece_after'))} "
                     f"| {number(row.get('brier_before'))} | {number(row.get('brier_after'))} |")
    lines += ["", "Lower is better for both. The calibrator was fitted on validation, so the test row is the "
                  "honest one. The reliability diagram (before and after) is `reports/plots/calibration.png`.", ""]
    return lines


def limitations(params: Params, report: dict) -> list[str]:
    """The caveats that apply to this model and evaluation."""
    test = report["test"]
    items = []
    if params.source.kind == "synthetic_cxr":
        items.append("SYNTHETIC data: the images are generated; nothing here transfers to real patients.")
    if params.source.kind == "builtin_breast_cancer":
        items.append("A small public research data set from one institution; not representative of a "
                     "screening population.")
    if test["n"] < SMALL_TEST_SET:
        items.append(f"Small test set ({test['n']} items, {test['n_positive']} positive): the intervals "
                     f"above are wide and the point estimates uncertain.")
    interval = test.get("sensitivity_ci")
    if interval and interval[0] < params.evaluate.target_sensitivity:
        items.append(f"The lower end of the test sensitivity interval ({interval[0]:.3f}) is below the "
                     f"target ({params.evaluate.target_sensitivity:g}): the threshold may miss more cases "
                     f"than intended.")
    small = params.promote.subgroup_min_count
    small_groups = [f"{column}={value} (n={row['n']})"
                    for column, values in sorted(report["subgroups"].items())
                    for value, row in sorted(values.items()) if row["n"] < small]
    if small_groups:
        items.append(f"Subgroups too small to judge (fewer than {small} items): " + ", ".join(small_groups) + ".")
    sites = report["subgroups"].get("site")
    if sites is not None and len(sites) <= 1:
        items.append("Single site: performance at other sites, scanners or populations is unknown.")
    elif sites is None:
        items.append("No site information: whether the model generalises across sites is unknown.")
    missing = sorted(set(params.evaluate.subgroups) - set(report["subgroups"]))
    if missing:
        items.append(f"Subgroups not assessed (no data): {', '.join(missing)}.")
    if test.get("ece") is not None and test["ece"] > params.promote.max_ece:
        items.append(f"Poorly calibrated (ECE {test['ece']:.3f}): read the score as a ranking, not a probability.")
    items.append("Retrospective evaluation on data from the same sources as training (internal "
                 "validation only); no prospective or external validation.")
    items.append("Labels are as recorded by the source (and clinicians' feedback); label errors "
                 "bound the measured performance.")
    return items
