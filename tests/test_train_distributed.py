"""Training across processes: two workers on 127.0.0.1 (CPU, ring all-reduce) under a
MultiWorkerMirroredStrategy reach the quality of one process on the same data, and leave one
MLflow run and one model (the chief's)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, free_port, load, make_workspace, tabular_params
from pipelines import clean, collect, preprocess, train
from pipelines.config import parse_params
from pipelines.data import inputs
from pipelines.errors import MedloopError
from pipelines.model import architectures as models

EPOCHS = 5


def validation_auroc(layout) -> float:
    """The AUROC of the saved model on the validation split, computed here from the file."""
    from sklearn.metrics import roc_auc_score

    params = load(layout)
    data = inputs.tabular_dataset(layout, "validation", params, training=False)
    probabilities = models.class_probabilities(models.load_model(layout.model_file), data)
    positive = params.model.classes.index(params.model.positive_class)
    return float(roc_auc_score(train.dataset_labels(data) == positive, probabilities[:, positive]))


def mlflow_runs(layout) -> list:
    import mlflow
    from mlflow import MlflowClient

    from pipelines.registry.tracking import tracking_uri

    params = load(layout)
    mlflow.set_tracking_uri(tracking_uri(params, layout))
    experiment = MlflowClient().get_experiment_by_name(params.tracking.experiment)
    return [] if experiment is None else MlflowClient().search_runs([experiment.experiment_id])


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The breast-cancer table taken to data/processed, and trained by one process."""
    raw = tabular_params()
    raw["train"].update(epochs=EPOCHS, distribution="none")
    with pytest.MonkeyPatch.context() as patch:
        from conftest import SALT

        patch.setenv("MEDLOOP_DEID_SALT", SALT)
        layout = make_workspace(tmp_path_factory.mktemp("distributed"), raw)
        params = load(layout)
        collect.run(params, layout)
        clean.run(params, layout)
        preprocess.run(params, layout)
        result = train.run(params, layout)
    return layout, result


@pytest.mark.slow
def test_two_workers_match_one_process_with_one_run_and_one_model(one_process, tmp_path):
    single, single_result = one_process
    layout = type(single).at(shutil.copytree(single.root, tmp_path / "ws", symlinks=True))
    layout.model_file.unlink()
    layout.train_json.unlink()
    runs_before = {run.info.run_id for run in mlflow_runs(layout)}

    raw = yaml.safe_load(layout.params_file.read_text())
    raw["train"].update(distribution="multi_worker", workers=[f"127.0.0.1:{free_port()}" for _ in range(2)])
    layout.params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("TF_CONFIG", None)
    workers = [
        subprocess.Popen([sys.executable, "-m", "pipelines.train"], cwd=layout.root, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         env={**env, "MEDLOOP_WORKER_INDEX": str(index)})
        for index in range(2)
    ]
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]

    record = json.loads(layout.train_json.read_text())
    assert record["device"]["strategy"] == "MultiWorkerMirroredStrategy"
    assert record["device"]["workers"] == 2 and record["device"]["replicas"] == 2
    assert abs(validation_auroc(layout) - validation_auroc(single)) <= 0.02
    assert abs(record["best_val_auroc"] - single_result.best_val_auroc) <= 0.02
    assert models.weights_digest(models.load_model(layout.model_file)) == record["weights_sha256"]

    new_runs = [run for run in mlflow_runs(layout) if run.info.run_id not in runs_before]
    assert [run.info.run_id for run in new_runs] == [record["run_id"]]  # the chief's run, and only it
    assert new_runs[0].data.tags["medloop.device.workers"] == "2"
    assert "MLflow run" in outputs[0] and "the chief saves the model" in outputs[1]


def test_a_multi_worker_cluster_is_named_or_refused(monkeypatch):
    spec = parse_params(tabular_params()).train.model_copy(
        update={"distribution": "multi_worker", "workers": ["10.0.0.5:2222", "10.0.0.6:2222"]})
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.setenv("MEDLOOP_WORKER_INDEX", "1")
    assert train.worker_cluster(spec) == (["10.0.0.5:2222", "10.0.0.6:2222"], 1)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:1", "c:1"]},
                                                "task": {"type": "worker", "index": 2}}))
    assert train.worker_cluster(spec) == (["a:1", "b:1", "c:1"], 2)  # TF_CONFIG wins

    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:1"]},
                                                "task": {"type": "chief", "index": 0}}))
    with pytest.raises(MedloopError, match=r"names a 'chief' task or cluster roles \['chief', 'worker'\]"):
        train.worker_cluster(spec)  # a chief and worker 0 would both log and save

    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(MedloopError, match="TF_CONFIG is not a worker cluster"):
        train.worker_cluster(spec)
    monkeypatch.delenv("TF_CONFIG")
    monkeypatch.setenv("MEDLOOP_WORKER_INDEX", "2")
    with pytest.raises(MedloopError, match=r"worker index 2 is not among the 2 workers.*0\.\.1"):
        train.worker_cluster(spec)
    with pytest.raises(MedloopError, match="neither TF_CONFIG nor train.workers"):
        train.worker_cluster(spec.model_copy(update={"workers": []}))

    raw = tabular_params()
    raw["train"]["workers"] = ["no-port"]
    with pytest.raises(Exception, match="'no-port' is not host:port"):
        parse_params(raw)
