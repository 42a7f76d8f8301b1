"""Embedded tasks for ``inpo run``: small worlds with an exact oracle and exact evaluation.

:mod:`inpo.tasks.default` is the default task (a prompt grammar, 399 enumerable responses, a
cyclic annotator panel, a tiny Llama reference). Importing this package is light: transformers
and torch are imported inside the functions that need them.
"""

from inpo.tasks.bt import BTRewardOracle
from inpo.tasks.default import DefaultTask, DefaultTaskConfig, default_cache_dir
from inpo.tasks.evaluate import PolicyTable, evaluate_tables, policy_table, sample_responses

__all__ = [
    "BTRewardOracle",
    "DefaultTask",
    "DefaultTaskConfig",
    "PolicyTable",
    "default_cache_dir",
    "evaluate_tables",
    "policy_table",
    "sample_responses",
]
