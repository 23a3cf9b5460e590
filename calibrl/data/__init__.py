"""Data layer: the example schema on disk, validated parquet reading, prompt sampling, the paper's
prompt template and a synthetic verifiable multi-modal task.

    from calibrl.data import load_examples, PromptSampler
    examples, report = load_examples(cfg.data.train_files, expert_key=cfg.data.expert_key, ...)
    sampler = PromptSampler(examples, cfg.trainer.prompts_per_step, seed=cfg.trainer.seed)
"""

from calibrl.data.prompts import format_prompt, to_chat_messages
from calibrl.data.reader import DataError, FileReport, PromptSampler, ReadReport, iter_examples, load_examples
from calibrl.data.schema import EXAMPLE_SCHEMA, Example, examples_to_table, write_examples

__all__ = [
    "EXAMPLE_SCHEMA",
    "DataError",
    "Example",
    "FileReport",
    "PromptSampler",
    "ReadReport",
    "examples_to_table",
    "format_prompt",
    "iter_examples",
    "load_examples",
    "to_chat_messages",
    "write_examples",
]
