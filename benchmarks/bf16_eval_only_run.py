"""A suite run whose image-encoder evaluation alone is in bf16: pretraining, fine-tunes and zero-shot
heads as the config says (fp32 by default), every lambda point's forward pass under bf16 autocast.

Separates what bf16 evaluation does to the selections from what bf16 training does (docs/metrics.md,
"Precision and the lambda curve"). Give it a cache of its own without ``evals/`` (the evaluation cache
does not know about this switch):

    NEGMERGE_CACHE=/tmp/c python benchmarks/bf16_eval_only_run.py run mini-clip-tiny --out /tmp/r --no-report
"""

from __future__ import annotations

import dataclasses
import sys

import bench.evaluate as evaluate
from bench.cli import main

_init = evaluate.Evaluator.__init__


def _bf16_evaluator(self, backbone, batch_size=512, runtime=evaluate.CPU):
    _init(self, backbone, batch_size, dataclasses.replace(runtime, precision="bf16"))


evaluate.Evaluator.__init__ = _bf16_evaluator

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
