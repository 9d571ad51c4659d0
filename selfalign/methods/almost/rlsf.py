"""`rlsf`: reinforcement learning from synthetic feedback (ALMoST, Kim et al. 2023, step 3).

The SFT policy is optimised against the synthetic reward model with a KL penalty that keeps it
close to itself. The paper uses PPO; this stage uses RLOO (REINFORCE leave-one-out, TRL's
`RLOOTrainer`), because TRL removed its PPO trainer and RLOO is its stable on-policy trainer for a
scalar reward model. What changes against PPO:

- no value network: k replies are sampled per prompt (`num_generations`, default 4) and each
  reply's baseline is the mean reward of the other k-1 replies to the same prompt;
- the KL to the SFT policy enters as a penalty in the reward: reward = RM score − `beta` × the
  reply's summed per-token log-ratio log π(y_t) − log π_SFT(y_t); the update is PPO's clipped
  objective, but on whole-sequence log-probabilities with that advantage;
- one update per batch of samples (TRL's default `num_iterations` 1), no GAE, no value loss.

The reward function wraps `selfalign.core.rewards.RewardModel`, so the reward model reads exactly the
text format it was trained on: `reward_text(dialogue, reply)` (see `selfalign.methods.almost.rloo`).

Inputs: `model:` (default `@sft`) is the policy and the KL reference; `reward_model:` a folder or
`@reward_model`; `prompts:` the prompt set (default `@mine_prompts`), of which `heldout` prompts
(a seeded sample) are set aside and never trained on.

Policy: a LoRA adapter by default (CPU-sized; the reference is then the same network with the
adapter off); `lora: false` trains all weights against a frozen copy.

Outputs: `adapter/` (or `model/`), `trainer_state.json` (per step: `reward`, `kl`,
`completions/mean_length`, `loss`, ... — the report plots them), `prompts.jsonl` (every prompt and
its split), and the held-out evaluation: the SFT policy and the RLSF policy each answer the held-out
prompts (sampled as in training: same temperature, top-p and length; EOS ends a reply); the reward
model scores every reply, and KL(RLSF ‖ SFT) is estimated on the RLSF samples as the mean over
samples of Σ_tokens log p_RLSF − log p_SFT (both from the engines' `score_many`). Rows of it go to
`rows.jsonl`, the numbers to `heldout.json` and the done-marker.

Defaults and their sources: PPO's hyperparameters are not published, so these are RLOO's usual
ones for a small run: beta 0.05 (TRL's default), k 4, temperature 1.0, top-p 1.0 (sampling from
the policy itself, so the log-probabilities the update uses are the sampler's), lr 1e-5 (TRL's 1e-6
is for full fine-tuning; a LoRA adapter needs a larger step), 2 prompts (8 replies) per step,
128-token replies, 1 epoch.

Simplifications: the KL estimate covers the reply's tokens, not the EOS that ends it; the held-out
reward is one sample per prompt; a prompt longer than `max_prompt_length` tokens is not used for
training (counted); a killed run that finished training reuses the trained policy and continues the
held-out evaluation; one killed during training trains again.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from pydantic import Field

from selfalign.core.engines import Sampling
from selfalign.core.errors import SelfAlignError
from selfalign.core.progress import console
from selfalign.core.recipe import StageConfig
from selfalign.core.store import RowStore, row_id
from selfalign.core.training import TrainSettings, model_output
from selfalign.evals.common import resolve_system
from selfalign.methods.almost.rloo import (
    RewardFunction,
    kl_estimate,
    policy_prompt,
    rl_dataset_rows,
    rloo_train,
)

TRAIN_RESULT = "train_result.json"
HELDOUT_FILE = "heldout.json"


class Config(StageConfig):
    stage: str = "rlsf"
    model: str | None = Field("@sft",
                              description="the policy to optimise, also the KL reference (default: the SFT model)")
    reward_model: str = Field("@reward_model", description="the synthetic reward model: a folder or @stage")
    prompts: str = Field("@mine_prompts", description="@<stage> (rows with `prompt`, `kept`) or a prompt file")
    heldout: int = Field(32, ge=1,
                         description="prompts set aside (a seeded sample), never trained on, for the evaluation")
    system: str | None = Field(None,
                               description="system prompt above each dialogue (default none, as the SFT stage trains)")
    train: TrainSettings = Field(default_factory=lambda: TrainSettings(lr=1e-5, warmup_ratio=0.0),
                                 description="how the policy is trained (not published: LoRA r 16, lr 1e-5, 1 epoch "
                                             "over the prompts, no warmup); its batch_size and max_length are not "
                                             "used: see prompts_per_step, num_generations, max_completion_length")
    beta: float = Field(0.05, ge=0, description="KL penalty coefficient (not published; TRL's default)")
    num_generations: int = Field(4, ge=2, description="k: replies sampled per prompt (the leave-one-out group)")
    prompts_per_step: int = Field(2, ge=1, description="prompts per optimisation step (k replies each)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature in training and the held-out evaluation")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus mass in training and the held-out evaluation")
    max_prompt_length: int = Field(256, ge=8,
                                   description="prompts longer than this (tokens, rendered) are not trained on")
    max_completion_length: int = Field(128, ge=1, description="most tokens per reply, in training and evaluation")
    rm_batch_size: int = Field(8, ge=1, description="reward-model scoring batch")
    rm_max_length: int = Field(1024, ge=8, description="reward-model input tokens (cut from the left)")
    max_prompts: int | None = Field(None, ge=1, description="train on at most N prompts (after the held-out split)")

    def human_inputs(self) -> list[tuple[str, str]]:
        return [(self.system, resolve_system(self.system) or "")] if self.system else []


def split_heldout(prompts: list[tuple[str, str]], n: int, seed: int) -> tuple[list, list]:
    """(training, held-out): `n` prompts drawn with `seed`, both lists in their original order."""
    n = min(n, len(prompts))
    picked = set(random.Random(seed).sample(range(len(prompts)), n))
    return ([p for i, p in enumerate(prompts) if i not in picked], [p for i, p in enumerate(prompts) if i in picked])


def _train(ctx, config: Config, folder: Path, policy: str, train: list[tuple[str, str]], system, rm) -> dict:
    """Train once: a finished training (its result file and model) is reused by a resumed run."""
    done = folder / TRAIN_RESULT
    if done.exists():
        result = json.loads(done.read_text())
        if Path(result.get("model", "")).exists():
            console.print(f"  training finished earlier; reusing {result['model']}")
            return result
    from selfalign.core.models import load_tokenizer, resolve

    tok = load_tokenizer(resolve(policy))
    rows = rl_dataset_rows([[{"role": "user", "content": p}] for _, p in train], system)
    fits = [r for r in rows if len(tok(r["prompt"])["input_ids"]) <= config.max_prompt_length]
    if len(fits) < len(rows):
        console.print(f"  [yellow]note:[/] {len(rows) - len(fits)} prompts longer than "
                      f"{config.max_prompt_length} tokens left out")
    if len(fits) < config.prompts_per_step:
        raise SelfAlignError(f"{config.label}: {len(fits)} training prompts, fewer than prompts_per_step "
                             f"({config.prompts_per_step})", "lower heldout or prompts_per_step, or mine more prompts")
    ctx.free_accelerator()
    result = rloo_train(policy, fits, RewardFunction(rm), folder, config.train, beta=config.beta,
                        num_generations=config.num_generations, prompts_per_step=config.prompts_per_step,
                        max_completion_length=config.max_completion_length, temperature=config.temperature,
                        top_p=config.top_p, seed=ctx.recipe.seed)
    result["prompts_too_long"] = len(rows) - len(fits)
    model_output(folder)  # raises if nothing was saved
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(done)
    return result


def evaluate_heldout(ctx, config: Config, store: RowStore, heldout: list[tuple[str, str]], policies: dict[str, str],
                     system, rm) -> dict:
    """Each policy answers the held-out prompts; the RM scores them; KL(rlsf ‖ sft) on the rlsf samples."""
    sampling = Sampling(temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_completion_length,
                        seed=ctx.recipe.seed)
    meta = ctx.provenance(config, policies["rlsf"], sampling, reward_model=rm.ref, system=system)
    requests = {pid: policy_prompt([{"role": "user", "content": p}], system) for pid, p in heldout}
    out: dict = {"prompts": len(heldout), "sampling": sampling.model_dump()}
    for name, model in policies.items():
        ids = {pid: row_id("rlsf-heldout", name, model, pid, requests[pid], sampling.model_dump())
               for pid, _ in heldout}
        pending = [(pid, p) for pid, p in heldout if ids[pid] not in store]
        if pending:
            console.print(f"  held-out: the {name} policy answers {len(pending)} prompts")
            outs = ctx.engine(model).generate([requests[pid] for pid, _ in pending], sampling)
            texts = [cs[0].text for cs in outs]
            rewards = rm.score([[{"role": "user", "content": p}] for _, p in pending], texts)
            logps = {}
            if name == "rlsf":  # the KL estimate: both policies' log-probabilities of the rlsf samples
                items = [(requests[pid], [t]) for (pid, _), t in zip(pending, texts, strict=True)]
                for which in ("rlsf", "sft"):
                    scored = ctx.engine(policies[which]).score_many([it for it in items if it[1][0]])
                    it = iter(scored)
                    logps[which] = [next(it)[0] if t else 0.0 for t in texts]
            rows = []
            for k, ((pid, p), t, cs, r) in enumerate(zip(pending, texts, outs, rewards, strict=True)):
                row = {"id": ids[pid], "prompt_id": pid, "prompt": p, "policy": name, "model": model, "completion": t,
                       "finish_reason": cs[0].finish_reason, "completion_tokens": cs[0].completion_tokens,
                       "reward": r, "meta": meta}
                if logps:
                    row.update(logp_rlsf=logps["rlsf"][k], logp_sft=logps["sft"][k])
                rows.append(row)
            store.append(rows)
        mine = [r for r in store if r["id"] in set(ids.values())]
        rewards = [r["reward"] for r in mine]
        mean = sum(rewards) / len(rewards)
        out[name] = {"model": model, "reward_mean": round(mean, 4),
                     "reward_std": round((sum((x - mean) ** 2 for x in rewards) / len(rewards)) ** 0.5, 4),
                     "mean_tokens": round(sum(r["completion_tokens"] for r in mine) / len(mine), 1),
                     "rewards": rewards}
        if name == "rlsf":
            out["kl_rlsf_sft"] = round(kl_estimate([r["logp_rlsf"] for r in mine], [r["logp_sft"] for r in mine]), 4)
    out["reward_gain"] = round(out["rlsf"]["reward_mean"] - out["sft"]["reward_mean"], 4)
    return out


def run(ctx, config: Config, folder) -> dict:
    from selfalign.core.rewards import RewardModel

    folder = Path(folder)
    policy = ctx.model_for(config)
    rm_ref = ctx.model_for(config, config.reward_model)
    system = resolve_system(config.system)
    everything = ctx.prompts(config.prompts)
    if len(everything) <= config.heldout:
        raise SelfAlignError(f"{config.label}: {len(everything)} prompts from {config.prompts}, not more than "
                             f"heldout ({config.heldout})", "lower heldout or give more prompts")
    train, heldout = split_heldout(everything, config.heldout, ctx.recipe.seed)
    if cap := ctx.max_prompts(config.max_prompts):
        train = train[:cap]
    store = RowStore(folder)
    (folder / "prompts.jsonl").write_text("".join(
        json.dumps({"id": pid, "prompt": p, "split": split}, ensure_ascii=False) + "\n"
        for split, part in (("train", train), ("heldout", heldout)) for pid, p in part), encoding="utf-8")
    rm = RewardModel(rm_ref, batch_size=config.rm_batch_size, max_length=config.rm_max_length)
    result = _train(ctx, config, folder, policy, train, system, rm)
    results = evaluate_heldout(ctx, config, store, heldout, {"sft": policy, "rlsf": result["model"]}, system, rm)
    tmp = folder / (HELDOUT_FILE + ".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(folder / HELDOUT_FILE)
    summary = {**{k: v for k, v in result.items() if k != "wall_s"}, "train_wall_s": result.get("wall_s"),
               "policy": policy, "reward_model": rm_ref, "train_prompts": len(train), "heldout_prompts": len(heldout),
               "heldout_reward_sft": results["sft"]["reward_mean"],
               "heldout_reward_rlsf": results["rlsf"]["reward_mean"],
               "heldout_reward_gain": results["reward_gain"], "heldout_kl_rlsf_sft": results["kl_rlsf_sft"]}
    console.print(f"  held-out reward: SFT {summary['heldout_reward_sft']} → RLSF {summary['heldout_reward_rlsf']}; "
                  f"KL(RLSF‖SFT) {summary['heldout_kl_rlsf_sft']} nats")
    store.mark_done(**summary)
    return summary


def report_section(stage: dict):
    """The held-out comparison: a table of both policies' rewards and the KL, and their reward histograms."""
    from selfalign.core.report_api import Bold, Chart, Code, Section, Series, Table, Text, read_json

    res = read_json(stage["folder"] / HELDOUT_FILE)
    if not isinstance(res, dict) or not all(isinstance(res.get(k), dict) for k in ("sft", "rlsf")):
        return None
    columns = ["policy", "model", "mean reward", "std", "reply tokens"]
    blocks = [Table(columns, [[name.upper(), Code("/".join(Path(str(res[name].get("model"))).parts[-2:])),
                               res[name].get("reward_mean"), res[name].get("reward_std"), res[name].get("mean_tokens")]
                              for name in ("sft", "rlsf")], numeric=columns[2:], style="metrics"),
              Text(["reward gain ", Bold(res.get("reward_gain")), "; KL(RLSF ‖ SFT) on the RLSF samples ",
                    Bold(res.get("kl_rlsf_sft")), f" nats per reply; {res.get('prompts')} held-out prompts, "
                    "never trained on, one sample each."])]
    series = []
    for i, name in enumerate(("sft", "rlsf")):
        values = res[name].get("rewards") or []
        if values:
            series.append(Series(f"{name.upper()} (mean {sum(values) / len(values):.2f})", [], values, color=i))
    if series:
        blocks.append(Chart("histogram", series, "held-out reward distribution: SFT and RLSF", xlabel="reward",
                            ylabel="replies", mean_lines=True, size=(6.2, 3.0)))
    return Section(f"stage-{stage['label']}", f"{stage['label']}: held-out reward, SFT vs RLSF", blocks)
