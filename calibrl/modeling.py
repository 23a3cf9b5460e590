"""Per-token log-probs (and entropy) of responses under a transformers model.

Rows are laid out as verl does: the prompt LEFT-padded to P tokens, the response RIGHT-padded to
T tokens, so every response starts at column P and the logits that predict it are the last T+1
positions (`logits_to_keep`), which keeps the full (B, P+T, vocab) logits from ever existing.
Text models get explicit position ids (left padding would otherwise shift them); Qwen-VL models
compute their multimodal rope positions from the attention mask, the image grid and the token types.
"""

from __future__ import annotations

import torch

from calibrl.algo.entropy import entropy_from_logits, logprobs_from_logits

NEVER_SAMPLED_BIAS = -100.0
"""vLLM logit bias on the tokens a response must never contain (see `never_sampled_token_ids`)."""


def never_sampled_token_ids(config) -> list[int]:
    """A VL model's image/video placeholder and vision start/end tokens: a sampled one would make the
    learner's input ill-formed (their count must match the image features), so the rollout engine
    biases them by NEVER_SAMPLED_BIAS and the learner's log-probs do the same (the policy that
    samples is the policy that learns). Empty for text-only models."""
    ids = [getattr(config, k, None) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                              "vision_end_token_id")]
    return [i for i in ids if i is not None] if is_vl_model(None, config) else []


def is_vl_model(model, config=None) -> bool:
    return hasattr(config or model.config, "vision_config")


def mm_token_type_ids(config, input_ids: torch.Tensor) -> torch.Tensor:
    """1 on image tokens, 2 on video tokens, 0 elsewhere: without it Qwen-VL models in transformers
    fall back to 1-D positions and disagree with vLLM's multimodal rope. Apply it to prompts only:
    a sampled response may contain an image-pad token id, which is text there (as in vLLM)."""
    return ((input_ids == config.image_token_id).int()
            + 2 * (input_ids == getattr(config, "video_token_id", -1)).int())


def vl_forward_kwargs(model, input_ids: torch.Tensor, prompt_len: int) -> dict:
    """`mm_token_type_ids` for a transformers Qwen-VL forward/generate over prompt + generated tokens
    ({} for a text model): image tokens are typed only inside the prompt."""
    if not is_vl_model(model):
        return {}
    types = mm_token_type_ids(model.config, input_ids)
    types[:, prompt_len:] = 0
    return {"mm_token_type_ids": types}


def response_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                      response_mask: torch.Tensor, *, pixel_values: torch.Tensor | None = None,
                      image_grid_thw: torch.Tensor | None = None, temperature: float = 1.0,
                      with_entropy: bool = False, chunk_size: int = 4096, config=None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(response_t | prompt, response_<t) for each response token.

    prompt_ids, prompt_mask: (B, P) left-padded; response_ids, response_mask: (B, T) right-padded;
    pixel_values: (num_patches, D) for the images of all rows in row order; image_grid_thw: (num_images, 3).
    config: the HF config when `model` is a wrapper whose `.config` is something else (DeepSpeed's engine).
    Returns logp (B, T) float32 (0 where response_mask is 0) and, if asked, entropy (B, T).
    """
    config = config or model.config
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).long()
    kwargs: dict = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False,
                    "logits_to_keep": response_ids.shape[1] + 1}
    if is_vl_model(model, config):
        if pixel_values is not None:
            kwargs.update(pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                          mm_token_type_ids=torch.cat([mm_token_type_ids(config, prompt_ids),
                                                       torch.zeros_like(response_ids, dtype=torch.int)],
                                                      dim=1))
    else:
        kwargs["position_ids"] = (attention_mask.cumsum(1) - 1).clamp(min=0)
    logits = model(**kwargs).logits[:, :-1].float()
    never = never_sampled_token_ids(config)
    if never:
        logits[..., never] += NEVER_SAMPLED_BIAS
    if temperature != 1.0:
        logits = logits / temperature
    mask = response_mask.to(logits.dtype)
    logp = logprobs_from_logits(logits, response_ids, chunk_size=chunk_size) * mask
    entropy = entropy_from_logits(logits, chunk_size=chunk_size) * mask if with_entropy else None
    return logp, entropy
