"""TensorBoard event files (``torch.utils.tensorboard``): ``TRACKING_DIR/tensorboard/RUN/TIME``."""

from __future__ import annotations

import json
import time

from bench.tracking.base import Tracker
from bench.tracking.record import LAMBDA, RunRecord


class TensorboardTracker(Tracker):
    name = "tensorboard"
    modules = ("tensorboard",)
    install = "pip install tensorboard"

    def log(self, record: RunRecord) -> str:
        import numpy as np
        from matplotlib.image import imread
        from torch.utils.tensorboard import SummaryWriter

        root = self.settings.store / "tensorboard"
        logdir = root / record.name / time.strftime("%Y%m%d-%H%M%S")
        writer = SummaryWriter(log_dir=str(logdir))
        try:
            tags = "\n".join(f"- {k}: `{v}`" for k, v in record.tags.items())
            writer.add_text("run", tags)
            writer.add_text("config", "```json\n" + json.dumps(record.config, indent=1, default=str) + "\n```")
            for name, value in {**record.metrics, **record.costs}.items():
                writer.add_scalar(name, value, 0)
            for step, lam in enumerate(record.lambdas):
                writer.add_scalar(LAMBDA, lam, step)
            for name, series in record.curves.items():
                for step, value in series.items():
                    writer.add_scalar(name, value, step)
            if record.summary is not None:
                writer.add_text("report/summary", record.summary.read_text())
            for figure in record.figures:
                pixels = imread(figure)[..., :3]  # RGBA floats in [0, 1]
                writer.add_image(f"report/{figure.stem}", (pixels * 255).round().astype(np.uint8), 0, dataformats="HWC")
        finally:
            writer.close()
        return f"{logdir} (look: tensorboard --logdir {root})"
