"""Data layer: the example schema on disk (`schema`), atomic parquet writes (`parquet_io`), the
accepted file formats (`layout`), validated parquet reading (`reader`, errors in `errors`), prompt
sampling (`sampler`), the paper's prompt template (`prompts`) and a synthetic verifiable multi-modal
task (`synthetic`).

    from calibrl.data import load_examples, PromptSampler
    examples, report = load_examples(cfg.data.train_files, expert_key=cfg.data.expert_key, ...)
    sampler = PromptSampler(examples, cfg.trainer.prompts_per_step, seed=cfg.trainer.seed)
"""

from calibrl.data.parquet_io import write_parquet_atomic
from calibrl.data.prompts import format_prompt, to_chat_messages
from calibrl.data.reader import DataError, FileReport, ReadReport, iter_examples, load_examples
from calibrl.data.sampler import PromptSampler
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
    "write_parquet_atomic",
]
