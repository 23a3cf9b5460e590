"""Tiny random-weight Qwen2 (text) and Qwen2.5-VL (vision-language) checkpoints, built locally.

Nothing is downloaded: the tokenizer is a byte-level BPE with no merges (one token per byte plus
the Qwen special tokens), built with `tokenizers`, and the chat template places
`<|vision_start|><|image_pad|><|vision_end|>` for each image part. Both models are saved with
`save_pretrained` and load in transformers and in vLLM's CPU build (head_dim 32: vLLM's CPU
attention needs >= 32).

    python -m calibrl.tiny_models OUT_DIR          # writes OUT_DIR/tiny-qwen2 and OUT_DIR/tiny-qwen2.5-vl
"""

from __future__ import annotations

import argparse
import os

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>",
                  "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
VOCAB_SIZE = 320  # >= 256 bytes + 7 specials; a multiple of 64 keeps the lm_head aligned

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Image sizes the VL processor resizes to: 4..16 merged visual tokens per image.
IMAGE_MIN_PIXELS = 28 * 28 * 4
IMAGE_MAX_PIXELS = 28 * 28 * 16


def build_tokenizer(model_max_length: int = 2048):
    """A byte-level tokenizer with Qwen's special tokens and a chat template that places images."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None, model_max_length=model_max_length)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _text_config(tok, *, hidden_size: int, num_layers: int, max_positions: int) -> dict:
    return {"vocab_size": VOCAB_SIZE, "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size,
                "num_hidden_layers": num_layers, "num_attention_heads": hidden_size // 32,
                "num_key_value_heads": 2,
                "max_position_embeddings": max_positions, "tie_word_embeddings": False,
                "bos_token_id": None, "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
                "pad_token_id": tok.pad_token_id}


def make_tiny_qwen2(out_dir: str, *, hidden_size: int = 128, num_layers: int = 2,
                    max_positions: int = 2048, seed: int = 0) -> str:
    """Tiny random Qwen2ForCausalLM + tokenizer saved in `out_dir`; returns out_dir."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer(max_positions)
    cfg = Qwen2Config(**_text_config(tok, hidden_size=hidden_size, num_layers=num_layers,
                                     max_positions=max_positions), rope_theta=10000.0)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).to(torch.float32)
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


def make_tiny_qwen25_vl(out_dir: str, *, hidden_size: int = 128, num_layers: int = 2,
                        max_positions: int = 2048, seed: int = 0) -> str:
    """Tiny random Qwen2.5-VL (2-block vision tower, PIL image processor) saved in `out_dir`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = build_tokenizer(max_positions)
    ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS}
    head_dim = 32
    text = _text_config(tok, hidden_size=hidden_size, num_layers=num_layers, max_positions=max_positions)
    # mrope sections (temporal, height, width) must sum to head_dim / 2
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}
    assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2
    vision = {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
                  "out_hidden_size": hidden_size, "patch_size": 14, "spatial_merge_size": 2,
                  "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [1],
                  "in_channels": 3}
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                           image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                           vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).to(torch.float32)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    Qwen2VLImageProcessorPil(min_pixels=IMAGE_MIN_PIXELS, max_pixels=IMAGE_MAX_PIXELS, patch_size=14,
                             merge_size=2, temporal_patch_size=2).save_pretrained(out_dir)
    return out_dir


def make_all(root: str, **kwargs) -> dict[str, str]:
    """Both tiny models under `root`; skips a model whose directory already holds weights."""
    out = {}
    for name, fn in [("tiny-qwen2", make_tiny_qwen2), ("tiny-qwen2.5-vl", make_tiny_qwen25_vl)]:
        path = os.path.join(root, name)
        if not os.path.exists(os.path.join(path, "model.safetensors")):
            fn(path, **kwargs)
        out[name] = path
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--num-layers", type=int, default=2)
    args = ap.parse_args()
    for name, path in make_all(args.out_dir, hidden_size=args.hidden_size,
                               num_layers=args.num_layers).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
