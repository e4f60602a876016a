"""MLflow: a local SQLite store by default (``TRACKING_DIR/mlflow.db``), or any tracking URI."""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request

from bench.tracking.base import Tracker
from bench.tracking.record import LAMBDA, RunRecord

BATCH = 1000  # MLflow's most entities in one log_batch call
PARAM_BATCH = 100
PARAM_VALUE_MAX = 6000


class MlflowTracker(Tracker):
    name = "mlflow"
    modules = ("mlflow", "sqlalchemy", "alembic")
    install = "pip install mlflow-skinny sqlalchemy alembic"

    @property
    def uri(self) -> str:
        return self.settings.uri or f"sqlite:///{(self.settings.store / 'mlflow.db').resolve()}"

    def unreachable(self) -> str | None:
        if not self.uri.startswith(("http://", "https://")):
            return None
        try:
            urllib.request.urlopen(f"{self.uri.rstrip('/')}/health", timeout=5).close()
        except (urllib.error.URLError, OSError) as exc:
            return f"mlflow: the tracking server {self.uri} cannot be reached ({getattr(exc, 'reason', exc)})"
        return None

    def log(self, record: RunRecord) -> str:
        from mlflow.entities import Metric, Param, RunStatus
        from mlflow.tracking import MlflowClient

        for noisy in ("mlflow", "alembic"):  # table creation and migrations log at INFO
            logging.getLogger(noisy).setLevel(logging.WARNING)
        local = not self.uri.startswith(("http://", "https://", "databricks"))  # artifacts beside the store
        if local:
            self.settings.store.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=self.uri)
        experiment = client.get_experiment_by_name(self.settings.project)
        if experiment is None:
            artifacts = (self.settings.store / "mlflow-artifacts").resolve().as_uri() if local else None
            experiment_id = client.create_experiment(self.settings.project, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        run = client.create_run(experiment_id, run_name=record.name, tags=record.tags)
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        params = [Param(k[:250], v[:PARAM_VALUE_MAX]) for k, v in record.params.items()]
        for i in range(0, len(params), PARAM_BATCH):
            client.log_batch(run_id, params=params[i : i + PARAM_BATCH])
        metrics = [Metric(k, v, now, 0) for k, v in {**record.metrics, **record.costs}.items()]
        metrics += [Metric(LAMBDA, lam, now, step) for step, lam in enumerate(record.lambdas)]
        metrics += [Metric(k, v, now, step) for k, series in record.curves.items() for step, v in series.items()]
        for i in range(0, len(metrics), BATCH):
            client.log_batch(run_id, metrics=metrics[i : i + BATCH])
        for path in record.artifacts:
            client.log_artifact(run_id, str(path), artifact_path="report" if path.parent.name == "report" else None)
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
        return f"{self.uri} run {run_id} (look: mlflow ui --backend-store-uri {self.uri})"
