"""Model inputs from a prompt: chat rendering, image decoding and the transformers-side VL tensors.

The rollout engine (vLLM) receives the rendered chat text with one `<|image_pad|>` per image and
expands it itself; it returns the expanded prompt token ids. The learner (transformers) gets
those same ids plus `pixel_values` / `image_grid_thw` from the checkpoint's image processor, so
both sides see identical tokens. `expand_image_pads` reproduces vLLM's expansion for callers that
start from text (tests, evaluation with transformers).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
from PIL import Image

from calibrl.data.prompts import to_chat_messages

IMAGE_PAD = "<|image_pad|>"


def render_chat(tokenizer, prompt_text: str) -> str:
    """The generation prompt for `prompt_text` (with `<image>` placeholders) under the chat template."""
    return tokenizer.apply_chat_template(to_chat_messages(prompt_text), tokenize=False,
                                         add_generation_prompt=True)


def decode_images(images: Sequence[bytes]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(b)).convert("RGB") for b in images]


def image_tensors(image_processor, images: Sequence[bytes]) -> dict[str, torch.Tensor]:
    """pixel_values (num_patches, C*T*P*P) and image_grid_thw (num_images, 3) for encoded images."""
    out = image_processor(images=decode_images(images), return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def expand_image_pads(text: str, counts: Sequence[int]) -> str:
    """Repeat the i-th `<|image_pad|>` counts[i] times (that image's merged visual tokens), as vLLM does."""
    parts = text.split(IMAGE_PAD)
    if len(parts) - 1 != len(counts):
        raise ValueError(f"prompt has {len(parts) - 1} image pads but {len(counts)} images")
    return parts[0] + "".join(IMAGE_PAD * c + p for c, p in zip(counts, parts[1:]))


def grid_token_counts(image_grid_thw: torch.Tensor, merge_size: int) -> list[int]:
    return (image_grid_thw.prod(-1) // merge_size**2).tolist()


def image_token_count(image: bytes, *, patch_size: int = 14, merge_size: int = 2,
                      min_pixels: int = 28 * 28 * 4, max_pixels: int = 28 * 28 * 16) -> int:
    """Merged visual tokens a Qwen-VL processor makes of one encoded image (reads only its header)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    width, height = Image.open(io.BytesIO(image)).size
    h, w = smart_resize(height, width, factor=patch_size * merge_size, min_pixels=min_pixels,
                        max_pixels=max_pixels)
    return (h // patch_size) * (w // patch_size) // merge_size**2


def prompt_token_ids(tokenizer, prompt_text: str, images: Sequence[bytes], **image_kwargs) -> list[int]:
    """The prompt ids the rollout engine will see: chat-rendered, each image pad expanded."""
    counts = [image_token_count(img, **image_kwargs) for img in images]
    return tokenizer(expand_image_pads(render_chat(tokenizer, prompt_text), counts),
                     add_special_tokens=False).input_ids


def response_token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Each text as an assistant response: its tokens without special tokens, then eos (how expert
    trajectories are fed to the learner)."""
    if not texts:
        return []
    eos = tokenizer.eos_token_id
    return [ids + [eos] for ids in tokenizer(list(texts), add_special_tokens=False).input_ids]
