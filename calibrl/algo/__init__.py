"""CalibRL and its baselines as pure tensor functions (docs/algorithm.md, sections 1-6).

Public API (the project's learner and driver use exactly these):

- reward (section 1): `verify(response, answer, *, pass_threshold=0.1) -> Verdict`
- advantages (section 2): `group_advantages`, DAPO's `overlong_penalty` and `informative_groups`
- losses (sections 3-5): `calibrl_loss`, `ppo_loss` (GRPO / Dr.GRPO / DAPO), `sft_loss`, `luffy_loss`,
  `rlplus_loss`, `agg_loss`, `token_weights`, `dual_clip_pg`, `calibration_term`, `k3_kl`,
  `compile_loss_kernels` (fuse the PG / CalibRL kernels with torch.compile)
- the method table: `METHODS[name]` (loss, knobs, loss rows, expert rows, expert in baseline,
  needs rollouts), `compute_loss`, `loss_token_mask`, `loss_normalizers`
- mixup (section 6): `MIXUP_POLICIES`
- data and the calibration stage: `Response`, `ExpertTrajectory`, `Group`, `TrainBatch`,
  `CalibrationStage`, `attach_expert_logprobs`
- `entropy_from_logits`, `logprobs_from_logits` (chunked over tokens)
"""

from calibrl.algo.advantages import group_advantages, group_stats, informative_groups, overlong_penalty
from calibrl.algo.batch import ExpertTrajectory, Group, Response, TrainBatch, attach_expert_logprobs
from calibrl.algo.calibration import CalibrationStage
from calibrl.algo.entropy import entropy_from_logits, logprobs_from_logits
from calibrl.algo.losses import (
                                 BASELINES,
                                 LOSS_AGGS,
                                 agg_loss,
                                 calibration_term,
                                 calibrl_loss,
                                 compile_loss_kernels,
                                 dual_clip_pg,
                                 k3_kl,
                                 loss_kernels_compiled,
                                 luffy_loss,
                                 ppo_loss,
                                 rlplus_loss,
                                 sft_loss,
                                 token_weights,
)
from calibrl.algo.methods import (
                                 DEFAULT_METHOD,
                                 METHODS,
                                 SFT_WARMUP_METHOD,
                                 Method,
                                 compute_loss,
                                 has_signal,
                                 loss_normalizers,
                                 loss_token_mask,
)
from calibrl.algo.mixup import MIXUP_POLICIES
from calibrl.algo.reward import Verdict, verify

__all__ = [
                                 "BASELINES",
                                 "DEFAULT_METHOD",
                                 "LOSS_AGGS",
                                 "METHODS",
                                 "MIXUP_POLICIES",
                                 "SFT_WARMUP_METHOD",
                                 "CalibrationStage",
                                 "ExpertTrajectory",
                                 "Group",
                                 "Method",
                                 "Response",
                                 "TrainBatch",
                                 "Verdict",
                                 "agg_loss",
                                 "attach_expert_logprobs",
                                 "calibration_term",
                                 "calibrl_loss",
                                 "compile_loss_kernels",
                                 "compute_loss",
                                 "dual_clip_pg",
                                 "entropy_from_logits",
                                 "group_advantages",
                                 "group_stats",
                                 "has_signal",
                                 "informative_groups",
                                 "k3_kl",
                                 "logprobs_from_logits",
                                 "loss_kernels_compiled",
                                 "loss_normalizers",
                                 "loss_token_mask",
                                 "luffy_loss",
                                 "overlong_penalty",
                                 "ppo_loss",
                                 "rlplus_loss",
                                 "sft_loss",
                                 "token_weights",
                                 "verify",
]
