"""Weights & Biases, offline: a local run folder that ``wandb sync`` uploads later (no account, no network)."""

from __future__ import annotations

from bench.tracking.base import Tracker
from bench.tracking.record import LAMBDA, RunRecord


class WandbTracker(Tracker):
    name = "wandb"
    modules = ("wandb",)
    install = "pip install wandb"

    def log(self, record: RunRecord) -> str:
        import wandb

        self.settings.store.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            mode="offline",
            dir=str(self.settings.store),
            project=self.settings.project,
            name=record.name,
            group=record.suite,
            config={"suite_config": record.config, **record.tags},
            tags=[record.suite, record.tags["protocol"]],
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True, save_code=False),
        )
        try:
            run.define_metric(LAMBDA)
            for name in record.curves:
                run.define_metric(name, step_metric=LAMBDA)
            for step, lam in enumerate(record.lambdas):
                point = {name: series[step] for name, series in record.curves.items() if step in series}
                run.log({LAMBDA: lam, **point}, step=step)
            run.summary.update({**record.metrics, **record.costs})
            artifact = wandb.Artifact(f"{record.name}-files", type="run-files", metadata=record.tags)
            for path in record.artifacts:
                artifact.add_file(
                    str(path), name=f"{path.parent.name}/{path.name}" if path.parent.name == "report" else path.name
                )
            run.log_artifact(artifact)
            folder = run.dir.rsplit("/files", 1)[0]
        finally:
            run.finish()
        return f"{folder} (upload later: wandb sync {folder})"
