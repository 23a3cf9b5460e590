"""The tiny local models load in transformers and vLLM's CPU build, and the two agree."""

import json
import subprocess
import sys

import pytest
import torch

from calibrl.inputs import expand_image_pads, grid_token_counts, image_tensors, prompt_token_ids, render_chat
from calibrl.modeling import vl_forward_kwargs
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


VLLM_SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
from PIL import Image
import io
model, prompt, image_path = sys.argv[1:4]
llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
          kv_cache_memory_bytes=64 * 1024**2, limit_mm_per_prompt={"image": 1, "video": 0})
img = Image.open(image_path).convert("RGB")
out = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": img}}],
                   SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0),
                   use_tqdm=False)[0]
c = out.outputs[0]
print("RESULT" + json.dumps({"prompt_ids": list(out.prompt_token_ids), "ids": list(c.token_ids),
                              "logprobs": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]}))
"""


@pytest.mark.slow
def test_vl_model_through_vllm_matches_transformers(tiny_models, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    from calibrl.data.synthetic import generate_examples

    path = tiny_models["tiny-qwen2.5-vl"]
    example = generate_examples(1, seed=0, split="test", multimodal=True)[0]
    tok, proc = AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)
    chat = render_chat(tok, example.prompt)
    (tmp_path / "img.png").write_bytes(example.images[0])
    run = subprocess.run([sys.executable, "-c", VLLM_SCRIPT, path, chat, str(tmp_path / "img.png")],
                         check=False, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    v = json.loads(run.stdout.split("RESULT")[-1].splitlines()[0])

    vis = image_tensors(proc, example.images)
    ids = tok(expand_image_pads(chat, grid_token_counts(vis["image_grid_thw"], proc.merge_size)),
              return_tensors="pt").input_ids
    assert ids[0].tolist() == v["prompt_ids"]          # same tokens on both sides, image tokens included
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **vis,
                             **vl_forward_kwargs(model, ids, ids.shape[1]), max_new_tokens=12,
                             do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
        full = gen[:, : ids.shape[1] + 12]
        logits = model(input_ids=full, attention_mask=torch.ones_like(full), **vis,
                       **vl_forward_kwargs(model, full, ids.shape[1])).logits.float()
    hf_ids = gen[0, ids.shape[1]:].tolist()
    assert hf_ids == v["ids"]
    lp = torch.log_softmax(logits[0, ids.shape[1] - 1: -1], -1).gather(-1, full[0, ids.shape[1]:, None])[:, 0]
    assert torch.allclose(lp, torch.tensor(v["logprobs"]), atol=1e-4)


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
