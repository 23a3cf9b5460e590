"""Model inputs from a prompt: chat rendering, image decoding and the transformers-side VL tensors.

The rollout engine (vLLM) receives the rendered chat text with one `<|image_pad|>` per image and
expands it itself; it returns the expanded prompt token ids. The learner (transformers) gets
those same ids plus `pixel_values` / `image_grid_thw` from the checkpoint's image processor, so
both sides see identical tokens. `expand_image_pads` reproduces vLLM's expansion for callers that
start from text (tests, evaluation with transformers).
"""

from __future__ import annotations

import io
from typing import Sequence

import torch
from PIL import Image

from calibrl.data.prompts import to_chat_messages

IMAGE_PAD = "<|image_pad|>"


def render_chat(tokenizer, prompt_text: str) -> str:
    """The generation prompt for `prompt_text` (with `<image>` placeholders) under the chat template."""
    return tokenizer.apply_chat_template(to_chat_messages(prompt_text), tokenize=False, add_generation_prompt=True)


def decode_images(images: Sequence[bytes]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(b)).convert("RGB") for b in images]


def image_tensors(image_processor, images: Sequence[bytes]) -> dict[str, torch.Tensor]:
    """pixel_values (num_patches, C*T*P*P) and image_grid_thw (num_images, 3) for encoded images."""
    out = image_processor(images=decode_images(images), return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def expand_image_pads(text: str, image_grid_thw: torch.Tensor, merge_size: int) -> str:
    """Repeat each `<|image_pad|>` by that image's number of merged visual tokens (as vLLM does)."""
    counts = (image_grid_thw.prod(-1) // merge_size**2).tolist()
    parts = text.split(IMAGE_PAD)
    if len(parts) - 1 != len(counts):
        raise ValueError(f"prompt has {len(parts) - 1} image pads but {len(counts)} images")
    return parts[0] + "".join(IMAGE_PAD * c + p for c, p in zip(counts, parts[1:]))
