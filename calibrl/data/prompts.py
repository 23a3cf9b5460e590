"""The paper's prompt template and its chat-message form.

A prompt is plain text with one `<image>` placeholder per image (the convention of the reference
implementation's data files). `to_chat_messages` turns it into the content-part list that Qwen-VL
chat templates consume, splitting at the placeholders exactly as the reference code does
(empty text segments dropped, surrounding whitespace kept).
"""

from __future__ import annotations

import re

IMAGE_PLACEHOLDER = "<image>"

INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
    "The reasoning process MUST BE enclosed within <think> </think> tags. "
    "The final answer MUST BE put in <answer> </answer> tags."
)


def format_prompt(question: str, num_images: int) -> str:
    """`<image>`*num_images + ' ' + question + ' ' + INSTRUCTION; no prefix at all without images."""
    if num_images < 0:
        raise ValueError(f"num_images={num_images} must be >= 0")
    text = f"{question} {INSTRUCTION}"
    return f"{IMAGE_PLACEHOLDER * num_images} {text}" if num_images else text


def to_chat_messages(prompt_text: str) -> list[dict]:
    """One user message whose content parts follow the text: `{"type": "image"}` at each `<image>`,
    `{"type": "text", "text": ...}` for the text between them."""
    parts = []
    for segment in re.split(f"({re.escape(IMAGE_PLACEHOLDER)})", prompt_text):
        if segment == IMAGE_PLACEHOLDER:
            parts.append({"type": "image"})
        elif segment:
            parts.append({"type": "text", "text": segment})
    return [{"role": "user", "content": parts}]
