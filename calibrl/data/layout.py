"""On-disk example formats: which columns of a parquet file hold which `Example` field, and the
conversion and checks of one row.

Two on-disk formats are accepted and told apart per file from its schema (`detect_layout`):

- calibrl (`EXAMPLE_SCHEMA`): `prompt` is a string with `<image>` placeholders, `answer` a string,
  `images` a list of encoded image bytes, `experts` a list of strings. Only `prompt` and `answer`
  are required; a missing `id` becomes `"{file_stem}:{row}"`, a missing `data_source` the file stem.
- reference (the authors' verl fork): `prompt` is a list of chat messages `{role, content}` with
  `<image>` placeholders in the content strings, `images` a list of `{bytes, path}` structs,
  `reward_model.ground_truth` the answer, the expert chain of thought in the column named by
  `expert_key` (`solution` by default; a string or a list of strings), `data_source` optional, and
  the id `"{file_stem}:{extra_info.index}"` (or `"{file_stem}:{row}"`). The stem keeps ids unique
  when several files each number their rows from 0.
  The prompt text is the system and user message contents joined with "\\n" in message order:
  a system message is kept (it is part of what the authors' model saw) and leads the single user
  turn that `to_chat_messages` later builds. Any other role in a prompt is a bad row.

Either `images` layout (list of bytes, list of `{bytes}` structs) is accepted in either format.
A file whose columns do not fit either format raises `DataError` (reason `schema`).

`to_example` checks a row; the first problem found raises `BadRow`: no or empty answer; an image
whose bytes are absent or do not decode; `<image>` count different from the image count; more
images than `max_images`; an expert that is not a non-empty string; a prompt longer than
`max_prompt_length` tokens (measured by the caller's `prompt_length` callable, since only the
tokenizer and image processor know).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
from PIL import Image

from calibrl.data.errors import BadRow, DataError
from calibrl.data.schema import Example

# ---------------------------------------------------------------------------------------------
# Format detection: which columns hold which Example field


@dataclass(frozen=True)
class _Layout:
    format: str
    columns: list[str]  # top-level columns to read
    answer: str  # field name used in messages
    experts: str | None
    images: str | None
    data_source: str | None
    id: str | None


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _struct_field(t: pa.DataType, name: str) -> pa.Field | None:
    if pa.types.is_struct(t) and t.get_field_index(name) >= 0:
        return t.field(name)
    return None


def detect_layout(path: str, schema: pa.Schema, expert_key: str) -> _Layout:
    def fail(field_name: str, message: str) -> DataError:
        return DataError(path, None, field_name, message, reason="schema")

    names = set(schema.names)
    if "prompt" not in names:
        raise fail("prompt", "column missing: a calibrl or reference-format file needs a `prompt` column")
    prompt_t = schema.field("prompt").type
    if _is_string(prompt_t):
        fmt = "calibrl"
    elif _is_list(prompt_t) and _struct_field(prompt_t.value_type, "content") is not None \
            and _struct_field(prompt_t.value_type, "role") is not None:
        if not _is_string(prompt_t.value_type.field("content").type):
            raise fail("prompt", f"message content is {prompt_t.value_type.field('content').type}, "
                                 "expected a string with <image> placeholders")
        fmt = "reference"
    else:
        raise fail("prompt", f"type {prompt_t} is neither a string (calibrl) nor a list of "
                             "{role, content} messages (reference format)")

    if "images" in names:
        images_t = schema.field("images").type
        item = images_t.value_type if _is_list(images_t) else None
        bytes_field = _struct_field(item, "bytes") if item is not None else None
        struct_of_bytes = bytes_field is not None and _is_binary(bytes_field.type)
        if item is None or not (_is_binary(item) or struct_of_bytes):
            raise fail("images", f"type {images_t} is neither a list of binary nor a list of {{bytes}} "
                                 "structs")
    images = "images" if "images" in names else None
    data_source = "data_source" if "data_source" in names else None
    if data_source and not _is_string(schema.field("data_source").type):
        raise fail("data_source", f"type {schema.field('data_source').type}, expected a string")

    if fmt == "calibrl":
        if "answer" not in names:
            raise fail("answer", "column missing: calibrl files need an `answer` column (ground truth)")
        if not _is_string(schema.field("answer").type):
            raise fail("answer", f"type {schema.field('answer').type}, expected a string")
        if "id" in names and not _is_string(schema.field("id").type):
            raise fail("id", f"type {schema.field('id').type}, expected a string")
        experts = "experts" if "experts" in names else None
        id_col = "id" if "id" in names else None
        answer = "answer"
        columns = ["prompt", "answer"]
    else:
        gt = None
        if "reward_model" in names:
            gt = _struct_field(schema.field("reward_model").type, "ground_truth")
        if gt is None:
            raise fail("reward_model.ground_truth", "column missing: reference-format files need "
                                                    "`reward_model` with a `ground_truth` field")
        if not (_is_string(gt.type) or pa.types.is_integer(gt.type)):
            raise fail("reward_model.ground_truth", f"type {gt.type}, expected a string")
        experts = expert_key if expert_key in names else None
        has_index = "extra_info" in names and \
            _struct_field(schema.field("extra_info").type, "index") is not None
        id_col = "extra_info.index" if has_index else None
        answer = "reward_model.ground_truth"
        columns = ["prompt", "reward_model"] + (["extra_info"] if has_index else [])
    columns += [c for c in (images, experts, data_source, id_col) if c and "." not in c and c not in columns]
    return _Layout(fmt, columns, answer, experts, images, data_source, id_col)


# ---------------------------------------------------------------------------------------------
# Row conversion and checks


def _prompt_text(layout: _Layout, value) -> str:
    if value is None:
        raise BadRow("prompt", "missing", "missing prompt")
    if layout.format == "calibrl":
        text = value
    else:
        texts = []
        for message in value:
            role = (message or {}).get("role")
            if role not in ("system", "user"):
                raise BadRow("prompt", "role", f"message role {role!r}: only system and user messages "
                                                "are supported in a prompt")
            texts.append(message.get("content") or "")
        if not any(m.get("role") == "user" for m in value):
            raise BadRow("prompt", "missing", "no user message in the prompt")
        text = "\n".join(texts)
    if not text.strip():
        raise BadRow("prompt", "empty", "empty prompt")
    return text


def _answer(layout: _Layout, record: dict) -> str:
    if layout.format == "calibrl":
        value = record["answer"]
    else:
        value = (record["reward_model"] or {}).get("ground_truth")
    if value is None or not str(value).strip():
        raise BadRow(layout.answer, "missing", "missing ground-truth answer")
    return str(value)


def _images(value) -> tuple[bytes, ...]:
    images = []
    for k, item in enumerate(value or []):
        data = item.get("bytes") if isinstance(item, dict) else item
        if not data:
            hint = ""
            if isinstance(item, dict):
                hint = f" (path={item.get('path')!r}; only embedded bytes are read)"
            raise BadRow("images", "missing", f"image {k} has no bytes{hint}")
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.draft(None, (1, 1))  # JPEG: decode at 1/8 scale, which still reads every byte
                img.load()  # decodes the pixels: verify() alone misses truncated JPEG data
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
            raise BadRow("images", "undecodable", f"image {k} does not decode: {e}") from None
        images.append(bytes(data))
    return tuple(images)


def parse_experts(layout: _Layout, value) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise BadRow(layout.experts, "not_a_string",
                      f"expert is {type(value).__name__}, expected a string or a list of strings")
    for k, e in enumerate(items):
        if not isinstance(e, str):
            raise BadRow(layout.experts, "not_a_string",
                          f"expert {k} is {type(e).__name__}, expected a string")
        if not e.strip():
            raise BadRow(layout.experts, "empty", f"expert {k} is empty")
    return tuple(items)


def example_id(layout: _Layout, record: dict, stem: str, row: int) -> str:
    if layout.id == "id" and record["id"]:
        return record["id"]
    if layout.id == "extra_info.index" and (record["extra_info"] or {}).get("index") is not None:
        return f"{stem}:{record['extra_info']['index']}"
    return f"{stem}:{row}"


def to_example(layout: _Layout, record: dict, *, stem: str, row: int, max_images: int | None,
               max_prompt_length: int | None, prompt_length: Callable[[Example], int] | None) -> Example:
    prompt = _prompt_text(layout, record["prompt"])
    answer = _answer(layout, record)
    images = _images(record[layout.images]) if layout.images else ()
    placeholders = prompt.count("<image>")
    if placeholders != len(images):
        raise BadRow("prompt", "image_count_mismatch",
                      f"{placeholders} <image> placeholders but {len(images)} images")
    if max_images is not None and len(images) > max_images:
        raise BadRow("images", "too_many",
                      f"{len(images)} images, more than max_images_per_prompt={max_images}")
    experts = parse_experts(layout, record[layout.experts]) if layout.experts else ()
    source = (record[layout.data_source] if layout.data_source else None) or stem
    example = Example(id=example_id(layout, record, stem, row), prompt=prompt, images=images, answer=answer,
                      experts=experts, data_source=source)
    if prompt_length is not None and max_prompt_length is not None:
        n = prompt_length(example)
        if n > max_prompt_length:
            raise BadRow("prompt", "too_long", f"prompt is {n} tokens, longer than max_prompt_length="
                                                f"{max_prompt_length}")
    return example
