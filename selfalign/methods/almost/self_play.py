"""`self_play`: reward-model-guided self-play, RMSP (ALMoST, Kim et al. 2023, step 2 of the method).

ALMoST's demonstrations are written by the vanilla model talking to itself, with the synthetic
reward model as the only judge. Two copies of the model, each prompted for its role, hold a
conversation that opens with a mined prompt:

- the *assistant* continues the plain transcript `[system]\\n\\nHuman: ...\\n\\nAssistant:` under a
  system prompt (default: this project's short HHH preamble, `builtin:hhh_short`);
- the *user* continues `{user_prompt}\\n\\n{transcript so far}\\n\\nHuman:` with one follow-up
  message, where `user_prompt` (a field, written for this project) asks for a curious person who
  keeps the conversation going.

At every assistant turn N candidate replies are sampled (`candidates`, default 4), the reward model
scores each on the dialogue so far (`reward_text`, exactly what it was trained on; the system prompt
is not part of it) and the best one is kept, up to T assistant turns (`turns`, default 2). The
conversations, with the best reply at every turn, are the SFT stage's demonstrations.

Rows: one per conversation: `messages` (user/assistant turns), `turns` (for each assistant turn:
the user message it answers, every candidate with its score and finish reason, `chosen` and its
`reward`), `ended` (why the conversation stopped) and `kept` (at least one assistant turn).
A conversation ends early when the user model writes no follow-up, or when every candidate reply
is empty.

Resuming: conversations are played `chunk` at a time, all of a chunk's turn-1 candidates in one
engine call, then its follow-ups, then its turn-2 candidates, and so on; a chunk's rows are written
when its conversations finish. A killed run replays at most the chunk in flight and never a
finished conversation.

Defaults and their sources: N = 4 and T = 2 are not published (this project names them as the
choice); the sampling (temperature 1.0, top-p 0.9) is ALMoST's for synthetic responses; the reply
length (256 new tokens) and the follow-up length (64, as for mined prompts) are this project's.

Simplifications: the user model samples one follow-up per turn (it is not reward-guided, as in the
paper); empty candidates are never chosen; replies are cut at a new `Human:` turn (the plain
format's stop) and stripped; the user model and the assistant share one engine when they are the
same model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from pydantic import Field

from selfalign.core.assets_io import asset_text, load_yaml_mapping
from selfalign.core.chat import PLAIN_STOPS, render_plain
from selfalign.core.engines import Sampling
from selfalign.core.generation import Job, generate_rows, open_rows
from selfalign.core.progress import console
from selfalign.core.recipe import StageConfig
from selfalign.evals.common import resolve_system
from selfalign.methods.almost.rloo import policy_prompt

TEMPLATES_REF = "builtin:almost/templates.yaml"
USER_PROMPT = " ".join(load_yaml_mapping(TEMPLATES_REF, ("self_play_user",))["self_play_user"].split())
USER_STOPS = ["\n\n", "\nAssistant", "\nHuman"]


class Config(StageConfig):
    stage: str = "self_play"
    prompts: str = Field("@mine_prompts",
                         description="@<stage> (rows with `prompt`, `kept`) or a prompt file: the openings")
    assistant: str | None = Field(None,
                                  description="the assistant model (default: the stage's model, the vanilla LM); "
                                              "@stage allowed")
    user: str | None = Field(None,
                             description="the user model (default: the stage's model, the vanilla LM); @stage allowed")
    reward_model: str = Field("@reward_model",
                              description="the reward model that picks the best reply: a folder or @stage")
    system: str | None = Field("builtin:hhh_short",
                               description="the assistant's system prompt: text, a .txt file, hhh, "
                                           "builtin:NAME, or empty for none")
    user_prompt: str = Field(USER_PROMPT,
                             description="the instructions above the transcript that the user model continues")
    candidates: int = Field(4, ge=1, description="N: replies sampled at each assistant turn (not published)")
    turns: int = Field(2, ge=1, description="T: most assistant turns per conversation (not published)")
    sampling: Sampling = Field(default_factory=lambda: Sampling(temperature=1.0, top_p=0.9, max_new_tokens=256),
                               description="the assistant's sampling (n is `candidates`)")
    user_sampling: Sampling = Field(default_factory=lambda: Sampling(temperature=1.0, top_p=0.9, max_new_tokens=64),
                                    description="the user model's sampling (one follow-up a turn)")
    chunk: int = Field(32, ge=1, description="conversations played together; their rows are written when they finish")
    rm_batch_size: int = Field(8, ge=1, description="reward-model scoring batch")
    rm_max_length: int = Field(1024, ge=8, description="reward-model input tokens (cut from the left)")
    max_prompts: int | None = Field(None, ge=1)

    def human_inputs(self) -> list[tuple[str, str]]:
        # the shipped default is counted as its asset file; a recipe's own text as itself
        out = [(TEMPLATES_REF, asset_text(TEMPLATES_REF)) if self.user_prompt == USER_PROMPT
               else (f"{self.label}.user_prompt", self.user_prompt)]
        return out + ([(self.system, resolve_system(self.system) or "")] if self.system else [])


# -- pure helpers (unit-tested) ---------------------------------------------------------------------
def user_request(instructions: str, messages: Sequence[dict]) -> str:
    """The text the user model continues with the human's next message."""
    return f"{instructions.strip()}\n\n{render_plain(messages, add_generation_prompt=False)}\n\nHuman:"


def clean_reply(text: str, stops: Sequence[str] = ()) -> str:
    """A reply or follow-up as stored: cut at the first stop, surrounding whitespace removed."""
    cut = min((i for s in stops if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut].strip()


def pick_best(scores: Sequence[float | None]) -> int | None:
    """Index of the highest score (the first on ties); None scores (empty replies) are never picked."""
    best = None
    for i, s in enumerate(scores):
        if s is not None and (best is None or s > scores[best]):
            best = i
    return best


# -- the stage ------------------------------------------------------------------------------------
def play(chunk: list[tuple[str, str]], assistant, user, rm, config: Config, system: str | None,
         sampling: Sampling, user_sampling: Sampling) -> list[dict]:
    """Play a chunk of conversations to the end: [{messages, turns, ended}], one per opening prompt."""
    convs = [{"messages": [{"role": "user", "content": p}], "turns": [], "ended": None} for _, p in chunk]
    for t in range(config.turns):
        if t > 0:  # the user model writes the next human message
            live = [c for c in convs if c["ended"] is None]
            outs = user.generate([user_request(config.user_prompt, c["messages"]) for c in live], user_sampling)
            for c, cs in zip(live, outs, strict=True):
                follow_up = clean_reply(cs[0].text, USER_STOPS)
                if follow_up:
                    c["messages"].append({"role": "user", "content": follow_up})
                else:
                    c["ended"] = "no follow-up from the user model"
        live = [c for c in convs if c["ended"] is None]
        if not live:
            break
        outs = assistant.generate([policy_prompt(c["messages"], system) for c in live], sampling)
        texts = [[clean_reply(x.text, PLAIN_STOPS) for x in cs] for cs in outs]
        flat = [(ci, j) for ci, ts in enumerate(texts) for j, x in enumerate(ts) if x]
        scored = rm.score([live[ci]["messages"] for ci, _ in flat], [texts[ci][j] for ci, j in flat]) if flat else []
        scores = [[None] * len(ts) for ts in texts]
        for (ci, j), s in zip(flat, scored, strict=True):
            scores[ci][j] = s
        for c, cs, ts, ss in zip(live, outs, texts, scores, strict=True):
            best = pick_best(ss)
            if best is None:
                c["ended"] = "every candidate reply was empty"
                continue
            c["turns"].append({
                "user": c["messages"][-1]["content"],
                "candidates": [{"text": x, "score": s, "finish_reason": o.finish_reason,
                                "completion_tokens": o.completion_tokens}
                               for x, s, o in zip(ts, ss, cs, strict=True)],
                "chosen": best, "reward": ss[best]})
            c["messages"].append({"role": "assistant", "content": ts[best]})
    for c in convs:
        c["ended"] = c["ended"] or "turn limit"
    return convs


def run(ctx, config: Config, folder) -> dict:
    from selfalign.core.rewards import RewardModel

    assistant_ref = ctx.model_for(config, config.assistant)
    user_ref = ctx.model_for(config, config.user)
    rm_ref = ctx.model_for(config, config.reward_model)
    system = resolve_system(config.system)
    prompts = ctx.stage_prompts(config)
    seed = config.sampling.seed or ctx.recipe.seed
    sampling = config.sampling.model_copy(update={"n": config.candidates, "seed": seed,
                                                   "stop": list(dict.fromkeys([*config.sampling.stop, *PLAIN_STOPS]))})
    user_sampling = config.user_sampling.model_copy(update={
        "n": 1, "seed": config.user_sampling.seed or seed + 1,
        "stop": list(dict.fromkeys([*config.user_sampling.stop, *USER_STOPS]))})
    store = open_rows(folder)
    settings = dict(assistant=assistant_ref, user=user_ref, reward_model=rm_ref, system=system,
                    user_prompt=config.user_prompt,
                    candidates=config.candidates, turns=config.turns, user_sampling=user_sampling.model_dump())
    meta = ctx.provenance(config, assistant_ref, sampling, user_model=user_ref, reward_model=rm_ref, system=system,
                          user_sampling=user_sampling.model_dump(), candidates=config.candidates, turns=config.turns)
    helpers: dict = {}  # the user model's engine and the reward model, loaded with the first chunk that needs them

    def produce(assistant, jobs: list[Job]):
        if not helpers:
            helpers.update(user=ctx.engine(user_ref), rm=RewardModel(rm_ref, batch_size=config.rm_batch_size,
                                                                     max_length=config.rm_max_length))
        convs = play([(job.key, job.request) for job in jobs], assistant, helpers["user"], helpers["rm"], config,
                     system, sampling, user_sampling)
        return [[c] for c in convs], sum(x["completion_tokens"] for c in convs for t in c["turns"]
                                         for x in t["candidates"])

    jobs = [Job(pid, p) for pid, p in prompts]
    rows = generate_rows(ctx, store, stage="self_play", label=f"{config.label}: conversations", model=assistant_ref,
                         sampling=sampling, jobs=jobs, meta=meta, id_extra=settings, produce=produce,
                         chunk=config.chunk,
                         build_row=lambda job, _, c: {"prompt_id": job.key, "prompt": job.request,
                                                      "messages": c["messages"],
                                                      "turns": c["turns"], "assistant_turns": len(c["turns"]),
                                                      "ended": c["ended"], "kept": bool(c["turns"])}).rows
    summary = {"conversations": len(rows), "kept": sum(bool(r["kept"]) for r in rows), **turn_stats(rows),
               "ended": dict(Counter(r["ended"] for r in rows)), "assistant": assistant_ref, "user": user_ref,
               "reward_model": rm_ref}
    console.print(f"  {summary['kept']} of {len(rows)} conversations kept, "
                  f"{summary['assistant_turns']} assistant turns; "
                  f"mean reward of the chosen reply {summary['chosen_reward']} vs "
                  f"{summary['candidate_reward']} for all candidates")
    store.mark_done(**summary)
    return summary


def turn_stats(rows: list[dict]) -> dict:
    """Assistant turns, and the mean reward of the chosen replies against that of every candidate
    (the gain of best-of-N selection)."""
    turns = [t for r in rows for t in r.get("turns") or []]
    chosen = [t["reward"] for t in turns]
    every = [c["score"] for t in turns for c in t["candidates"] if c["score"] is not None]
    mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    return {"assistant_turns": len(turns), "chosen_reward": mean(chosen), "candidate_reward": mean(every)}


def report_section(stage: dict):
    """Best-of-N at a glance: per assistant turn, the chosen replies' mean reward against all candidates'."""
    from selfalign.core.report_api import Section, Table, Text, read_rows

    rows = read_rows(stage["folder"] / "rows.jsonl")
    if not rows:
        return None
    depth = max((len(r.get("turns") or []) for r in rows), default=0)
    table = []
    for t in range(depth):
        st = turn_stats([{"turns": [r["turns"][t]]} for r in rows if len(r.get("turns") or []) > t])
        table.append([t + 1, st["assistant_turns"], st["chosen_reward"], st["candidate_reward"]])
    ended = Counter(r.get("ended") for r in rows)
    columns = ["assistant turn", "conversations", "chosen reply reward", "all candidates reward"]
    return Section(f"stage-{stage['label']}", f"{stage['label']}: reward-model-guided self-play", [
        Table(columns, table, numeric=columns[1:], style="metrics"),
        Text([f"{len(rows)} conversations; ended: " + "; ".join(f"{k}: {v}" for k, v in ended.items())], muted=True)])
