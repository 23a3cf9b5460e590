"""The tiny local models load in transformers and count image tokens as the processor does (their
agreement with vLLM's CPU build, greedy tokens and log-probs: tests/actors/test_rollout.py)."""

from calibrl.inputs import grid_token_counts, image_tensors, prompt_token_ids, render_chat
from calibrl.tiny_models import build_tokenizer


def test_tokenizer_is_byte_level_and_round_trips():
    tok = build_tokenizer()
    text = "<think>2 + 3 = 5</think><answer>5</answer> ünï"
    ids = tok(text).input_ids
    assert tok.decode(ids) == text
    assert len(ids) == len(b"<think>2 + 3 = 5</think><answer>5</answer> ") + len("ünï".encode())


def test_chat_template_places_one_image_pad_per_image():
    tok = build_tokenizer()
    text = render_chat(tok, "<image><image> Compare the two pictures.")
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert text.endswith("<|im_start|>assistant\n")


def test_models_load_in_transformers(tiny_models):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    text_model = AutoModelForCausalLM.from_pretrained(tiny_models["tiny-qwen2"])
    cfg = AutoConfig.from_pretrained(tiny_models["tiny-qwen2"])
    assert cfg.hidden_size // cfg.num_attention_heads == 32  # vLLM CPU attention needs head_dim >= 32
    vl = AutoModelForImageTextToText.from_pretrained(tiny_models["tiny-qwen2.5-vl"])
    assert type(vl).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert sum(p.numel() for p in text_model.parameters()) < 2_000_000


def test_prompt_token_ids_count_image_tokens_like_the_processor(tiny_models):
    from transformers import AutoImageProcessor, AutoTokenizer

    from calibrl.data.synthetic import generate_examples

    path = tiny_models["tiny-qwen2.5-vl"]
    tok, proc = AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)
    ex = generate_examples(1, seed=0, split="test", multimodal=True)[0]
    grid = image_tensors(proc, ex.images)["image_grid_thw"]
    ids = prompt_token_ids(tok, ex.prompt, ex.images)
    assert (ids.count(tok.convert_tokens_to_ids("<|image_pad|>"))
            == grid_token_counts(grid, proc.merge_size)[0] == 9)
