"""NegMerge: machine unlearning by negating a sign-consensus merge of task vectors.

Dependency-light on purpose (torch + safetensors): the harness in ``bench/`` imports this, never the
reverse, so the method can be lifted into another codebase as is.
"""

from negmerge.arithmetic import apply, floating_keys, save_state, task_vector
from negmerge.errors import MergeInputError
from negmerge.merge import consensus_rate, sign_consensus_merge
from negmerge.sources import DictSource, DifferenceSource, SafetensorsSource, TensorSource, as_source
from negmerge.streaming import merge_elementwise

__all__ = [
    "DictSource",
    "DifferenceSource",
    "MergeInputError",
    "SafetensorsSource",
    "TensorSource",
    "apply",
    "as_source",
    "consensus_rate",
    "floating_keys",
    "merge_elementwise",
    "save_state",
    "sign_consensus_merge",
    "task_vector",
]
