"""On-policy RL against a reward model: TRL's `RLOOTrainer`, LoRA or full, for ALMoST's RLSF.

`rloo_train` fine-tunes a policy on prompts with the reward a `selfalign.core.rewards.RewardModel`
gives its sampled replies, with a KL penalty to the policy it started from. The reward model reads
exactly the text it was trained on (`reward_text(dialogue, reply)`: the plain-format dialogue, a
space, the reply, EOS, left-truncated), whatever chat format or system prompt the policy is
prompted with: `RewardFunction` gets the dialogue from a dataset column, not from the policy's
rendered prompt.

RLOO (REINFORCE leave-one-out) in one paragraph: for each prompt, k replies are sampled; each
reply's reward is the reward model's score minus `beta` times the sequence KL estimate
sum_t [log pi(y_t) - log pi_ref(y_t)]; its advantage is that reward minus the mean reward of the
other k-1 replies to the same prompt (the baseline, so no value network is trained); the policy
takes a clipped policy-gradient step on the sequence log-probability weighted by the advantage.

The reference policy is the starting policy. With LoRA (the default) it is the same network with
the adapter disabled, so no second copy is held in memory; with full fine-tuning TRL loads a frozen
copy from the policy's folder (saved first when the policy was an adapter).

Logged per step in `trainer_state.json` (TRL's names): `reward` (mean reward-model score),
`reward_std`, `kl` (mean per-token log-ratio to the reference), `completions/mean_length`,
`entropy`, `loss`, `clip_ratio/*`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

from selfalign.core.chat import render_plain
from selfalign.core.errors import SelfAlignError
from selfalign.core.models import load_model, resolve
from selfalign.core.progress import console
from selfalign.core.training import Trainee, TrainSettings, _atomic_save, _is_peft, device_and_dtype, fit, output_folder


def policy_prompt(dialogue: Sequence[dict], system: str | None = None) -> str:
    """The text a policy continues with its reply: `[system]\\n\\nHuman: ...\\n\\nAssistant:`."""
    messages = ([{"role": "system", "content": system}] if system else []) + list(dialogue)
    return render_plain(messages)


def kl_estimate(logp_policy: Sequence[float], logp_reference: Sequence[float]) -> float:
    """Monte-Carlo KL(policy || reference) from samples of the policy: the mean over samples of
    log p_policy(y) - log p_reference(y) (each a sum over the sample's tokens)."""
    if len(logp_policy) != len(logp_reference) or not logp_policy:
        raise ValueError("need the same, non-zero number of log-probabilities from both models")
    return sum(a - b for a, b in zip(logp_policy, logp_reference, strict=True)) / len(logp_policy)


class RewardFunction:
    """A TRL reward function that scores replies with a `RewardModel` on their dialogue.

    TRL calls it with the rendered `prompts`, the decoded `completions` and every other dataset
    column as a keyword: `dialogue` holds the JSON of the dialogue (user/assistant turns, no
    system prompt) the reply answers, which is what the reward model sees.
    """

    __name__ = "reward_model"  # TRL names its logged metrics after this (rewards/reward_model/mean)

    def __init__(self, reward_model):
        self.reward_model = reward_model
        self.calls = 0

    def __call__(self, prompts, completions, dialogue=None, **kwargs) -> list[float]:
        if dialogue is None:
            raise ValueError("the RL dataset needs a `dialogue` column (the reward model reads the dialogue)")
        self.calls += 1
        dialogues = [json.loads(d) if isinstance(d, str) else d for d in dialogue]
        return self.reward_model.score(dialogues, [str(c) for c in completions])


def rl_dataset_rows(dialogues: Sequence[Sequence[dict]], system: str | None = None) -> list[dict]:
    """`{"prompt": text the policy continues, "dialogue": JSON the reward model reads}` per dialogue."""
    return [{"prompt": policy_prompt(d, system), "dialogue": json.dumps(list(d), ensure_ascii=False)}
            for d in dialogues]


def rloo_train(
    policy: str,
    rows: list[dict],
    reward_fn: RewardFunction,
    out_dir: Path,
    settings: TrainSettings,
    *,
    beta: float = 0.05,
    num_generations: int = 4,
    prompts_per_step: int = 2,
    max_completion_length: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> dict:
    """RLOO-train `policy` on `rows` (from `rl_dataset_rows`); save into `out_dir`. `settings` is the
    `train:` block (its batch_size and max_length are not used: a step takes `prompts_per_step` prompts
    and `num_generations` replies to each, of at most `max_completion_length` tokens).

    Returns `{"model": folder to load, "steps", "prompts", "first_reward", "last_reward", "last_kl", ...}`.
    """
    from trl import RLOOConfig, RLOOTrainer

    started = time.time()
    out_dir = output_folder(out_dir)
    if not rows:
        raise SelfAlignError("no prompts to train on")
    resolved = resolve(policy)
    device, dtype = device_and_dtype()
    model, tokenizer = load_model(resolved, device=device, dtype=dtype)
    was_adapter = _is_peft(model)
    if was_adapter:
        model = model.merge_and_unload()  # the policy (and the KL reference) is the adapted model
    merge = settings.merge
    if was_adapter and settings.lora and not merge:
        console.print("  [yellow]note:[/] the policy is itself a LoRA adapter; the RL adapter is "
                      "merged into it on save")
        merge = True
    if not settings.lora and was_adapter:
        # full fine-tuning: TRL loads the frozen reference from the policy's folder, so there must be one
        ref_dir = out_dir / "reference"
        _atomic_save(ref_dir,
                     lambda f: (model.save_pretrained(f, safe_serialization=True), tokenizer.save_pretrained(f)))
        model.config._name_or_path = str(ref_dir)
    elif not settings.lora:
        model.config._name_or_path = str(Path(resolved.path).resolve()) if resolved.is_local else resolved.path
    model.train()

    batch = num_generations * prompts_per_step
    total_steps = (settings.max_steps if settings.max_steps > 0
                   else math.ceil(len(rows) * settings.epochs / (prompts_per_step * settings.grad_accum)))
    trainee = Trainee(policy, settings, out_dir, seed, model, tokenizer, merge, started)
    fitted = fit(trainee, rows, trainer_class=RLOOTrainer, config_class=RLOOConfig,
                 config_args=dict(num_generations=num_generations, max_completion_length=max_completion_length,
                                  temperature=temperature, top_p=top_p, beta=beta),
                 trainer_args={"reward_funcs": reward_fn}, peft_task="CAUSAL_LM",
                 total_steps=total_steps, batch_size=batch,
                 logging_steps=1,  # every step's reward and KL: the curves are the point of this stage
                 count_tokens=False, label="RLOO",
                 describe=f"RLOO on {policy} ({settings.kind}): {len(rows)} prompts, k {num_generations}, "
                          f"beta {beta:g}")

    log = fitted.trainer.state.log_history
    series = {key: [e[key] for e in log if isinstance(e.get(key), int | float)] for key in ("reward", "kl")}
    return fitted.save(
        losses=False,
        steps=int(fitted.trainer.state.global_step),
        prompts=len(rows),
        first_reward=round(series["reward"][0], 4) if series["reward"] else None,
        last_reward=round(series["reward"][-1], 4) if series["reward"] else None,
        last_kl=round(series["kl"][-1], 4) if series["kl"] else None,
    )
