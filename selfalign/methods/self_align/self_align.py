"""`self_align`: Principle-Driven Self-Alignment (Self-Align, Sun et al. 2023, §3.2).

The base model answers every prompt after a long fixed context: a short header, the principles,
and exemplars in which the assistant first writes its *internal thoughts* (which principles apply
and why) and then its answer. The model continues the same pattern for each new prompt:

    {header}
    Principles:
    1. Ethical: ...
    ...
    Human: {exemplar question}
    Assistant (internal thoughts): {which principles apply and why}
    Assistant: {answer}
    ...
    Human: {new prompt}
    Assistant (internal thoughts):

Paper defaults: temperature 0.5, top-p 0.9, up to 256 new tokens. The context is identical for
every prompt, so engines reuse its KV cache: the hf engine computes it once per call (its shared-
prefix path), vLLM's automatic prefix caching does the same on GPU.

One departure, for small base models: the structure is enforced rather than hoped for. The model
first writes its thoughts (one line), then the stage appends the answer tag and the model writes
the answer. A large model follows the exemplars' format unprompted; gemma-3-270m often does not,
and the paper's "keep only well-formed outputs" filter would then keep almost nothing.

Every answer is kept or dropped by pure, unit-tested filters, and a dropped row records why:
malformed (no thoughts or no answer section), cut off by the token cap, a repeated sentence, a phrase
that loops (one 4-word run three times: the same rule as the behaviour eval's repetition metric, applied
here to training answers only), text leaked from an exemplar
(a shared run of 8+ words), an answer that opens with a stock refusal formula (an apology or "as an AI"),
or one that only hedges (every sentence opens "I'm not sure", "I don't know" and the like). All rows, kept or not,
go to `rows.jsonl` (`kept`, `dropped`), so the filter is auditable. The wording and the exact
filter thresholds are this project's (the paper publishes the rules, not the numbers).
"""

from __future__ import annotations

import re
from collections import Counter

from pydantic import Field

from selfalign.core.assets_io import asset_text, load_yaml_list, load_yaml_mapping, yaml_key
from selfalign.core.dedup import answer_sentences, repeats_degenerately
from selfalign.core.engines import Sampling
from selfalign.core.generation import Job, generate_rows, open_rows
from selfalign.core.progress import console
from selfalign.core.recipe import StageConfig

# The scaffold's tags and the refusal rule are human-written text kept in an asset file that the
# supervision ledger counts. REFUSAL_OPENINGS: stock openings that carry no content, an apology
# before a refusal or "as an AI". A plain decline ("Logging into her account is illegal, so...") or
# an honest "I can't see live scores" is not listed: on a harmful or unanswerable prompt that is the
# answer to keep, and a filter that drops it keeps the answers that comply instead.
TEMPLATES_REF = "builtin:self_align/templates.yaml"
_TEMPLATES = load_yaml_mapping(TEMPLATES_REF, ("scaffold", "refusal_openings", "hedges"))
THOUGHTS_TAG = _TEMPLATES["scaffold"]["thoughts_tag"]
ANSWER_TAG = _TEMPLATES["scaffold"]["answer_tag"]
PRINCIPLES_HEADING = _TEMPLATES["scaffold"]["principles_heading"]
SEPARATOR = "\n\n###\n\n"
# A new turn of either side ends the answer: a small base model that starts "Assistant:" again would
# otherwise write a second answer into the first (and be dropped as repetitive, or teach run-ons).
STOPS = ["\n\nHuman:", "\nHuman:", "\n###", "\nAssistant:", "\nAssistant ("]
REFUSAL_OPENINGS = re.compile(_TEMPLATES["refusal_openings"], re.I)
HEDGE_OPENINGS = re.compile(_TEMPLATES["hedges"], re.I)
CLAUSE_BREAK = re.compile(r",\s*(?:but|and|so)\s+|;\s*|\s+because\s+", re.I)
LEAK_NGRAM = 8


class Config(StageConfig):
    stage: str = "self_align"
    prompts: str = Field("@self_instruct",
                         description="@<stage> (an earlier stage's rows with `prompt`) or a prompt file")
    principles: str = "builtin:self_align/principles.yaml"
    exemplars: str = "builtin:self_align/exemplars.yaml"
    system_prompts: str = "builtin:self_align/system_prompts.yaml"
    sampling: Sampling = Field(default_factory=lambda: Sampling(temperature=0.5, top_p=0.9, max_new_tokens=256))
    thoughts_tokens: int = Field(96, ge=1, description="most tokens of internal thoughts (one line)")
    chunk: int = Field(64, ge=1, description="prompts answered (thoughts, then answers) before their rows are written")
    max_prompts: int | None = Field(None, ge=1)
    drop_cut_off: bool = Field(True,
                               description="drop answers cut off by the token cap (else keep them, "
                                           "trained with an EOS)")

    def human_inputs(self) -> list[tuple[str, str]]:
        return [(ref, asset_text(ref)) for ref in (self.principles, self.exemplars, self.system_prompts, TEMPLATES_REF)]


# -- the prompt -----------------------------------------------------------------------------------
def principle_context(header: str, principles: list[dict], exemplars: list[dict]) -> str:
    """Everything before the new prompt: identical for every prompt, so its KV cache is shared."""
    rules = "\n".join(f"{i}. {p['name']}: {' '.join(p['text'].split())}" for i, p in enumerate(principles, start=1))
    shots = SEPARATOR.join(
        f"Human: {e['user'].strip()}\n\n{THOUGHTS_TAG} {' '.join(e['thoughts'].split())}\n\n"
        f"{ANSWER_TAG} {e['answer'].strip()}"
        for e in exemplars)
    return f"{' '.join(header.split())}\n\n{PRINCIPLES_HEADING}\n{rules}{SEPARATOR}{shots}{SEPARATOR}"


def principle_prompt(context: str, prompt: str) -> str:
    return f"{context}Human: {prompt.strip()}\n\n{THOUGHTS_TAG}"


# -- parsing and filters (pure functions, unit-tested) ---------------------------------------------
def split_thoughts(completion: str) -> tuple[str, str] | None:
    """(thoughts, answer) from what follows "Assistant (internal thoughts):", or None if malformed."""
    head, sep, answer = completion.partition(f"\n{ANSWER_TAG}")
    thoughts, answer = head.strip(), answer.strip()
    if not sep or not thoughts or not answer:
        return None
    return thoughts, answer


def sentences(text: str) -> list[str]:
    return [s for s in (x.strip().lower() for x in re.split(r"(?<=[.!?])\s+|\n+", text)) if len(s.split()) >= 3]


def has_repeated_sentence(answer: str) -> bool:
    return any(n > 1 for n in Counter(sentences(answer)).values())


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def leaks_exemplar(answer: str, exemplar_ngrams: set) -> bool:
    return bool(word_ngrams(answer, LEAK_NGRAM) & exemplar_ngrams)


def opens_with_refusal(answer: str) -> bool:
    return REFUSAL_OPENINGS.match(answer.strip().replace("\u2019", "'")) is not None


def only_hedges(answer: str) -> bool:
    """Every sentence and clause opens with "I'm not sure", "I don't know" and the like: the answer says nothing
    but that the model is unsure. (An honest "I can't know tomorrow's prices, because..." is kept: its
    second clause gives the reason.) Left in, these teach a small model to hedge on every prompt."""
    clauses = [c.strip() for s in answer_sentences(answer.replace("\u2019", "'")) for c in CLAUSE_BREAK.split(s)]
    clauses = [c for c in clauses if c]
    return bool(clauses) and all(HEDGE_OPENINGS.match(c) for c in clauses)


def verdict(completion: str, exemplar_ngrams: set,
            finish_reason: str = "stop") -> tuple[str | None, str | None, str | None]:
    """(thoughts, answer, why dropped or None). An answer cut off by the token cap is dropped: the
    trainer appends an end-of-text token to every answer, so a cut-off one would teach the model to
    stop mid-sentence (and a run-on that never ends is what the cap usually catches)."""
    parts = split_thoughts(completion)
    if parts is None:
        return None, None, "malformed: no internal thoughts or no answer"
    thoughts, answer = parts
    if finish_reason == "length":
        return thoughts, answer, "cut off at the token cap"
    if has_repeated_sentence(answer):
        return thoughts, answer, "repeated sentence"
    if repeats_degenerately(answer):
        return thoughts, answer, "a phrase loops"
    if leaks_exemplar(answer, exemplar_ngrams):
        return thoughts, answer, "copies an exemplar"
    if opens_with_refusal(answer):
        return thoughts, answer, "opens with a refusal formula"
    if only_hedges(answer):
        return thoughts, answer, "only hedges"
    return thoughts, answer, None


# -- the stage ------------------------------------------------------------------------------------
def run(ctx, config: Config, folder) -> dict:
    model = ctx.model_for(config)
    principles = load_yaml_list(config.principles, ("name", "text"))
    exemplars = load_yaml_list(config.exemplars, ("user", "thoughts", "answer"))
    header = yaml_key(config.system_prompts, "principle_header")
    context = principle_context(header, principles, exemplars)
    exemplar_ngrams = set().union(*(word_ngrams(e["answer"] + " " + e["user"], LEAK_NGRAM) for e in exemplars))
    prompts = ctx.stage_prompts(config)
    sampling = config.sampling.model_copy(update={"n": 1, "seed": config.sampling.seed or ctx.recipe.seed,
                                                   "stop": list(dict.fromkeys([*config.sampling.stop, *STOPS]))})
    store = open_rows(folder)
    thought_sampling = sampling.model_copy(update={"max_new_tokens": config.thoughts_tokens, "stop": ["\n"]})

    def produce(engine, jobs: list[Job]):
        """1. the internal thoughts, one line; 2. the answer, after the thoughts and the answer tag."""
        thoughts = [cs[0] for cs in engine.generate([job.request for job in jobs], thought_sampling)]
        answers = engine.generate([f"{job.request} {t.text.strip()}\n\n{ANSWER_TAG}"
                                   for job, t in zip(jobs, thoughts, strict=True)],
                                  sampling)
        tokens = sum(t.completion_tokens + cs[0].completion_tokens for t, cs in zip(thoughts, answers, strict=True))
        return [[(t, cs[0])] for t, cs in zip(thoughts, answers, strict=True)], tokens

    def build_row(job: Job, _, output) -> dict:
        t, answer_completion = output
        completion = f" {t.text.strip()}\n\n{ANSWER_TAG}{answer_completion.text}"
        th, answer, why = verdict(completion, exemplar_ngrams,
                                  answer_completion.finish_reason if config.drop_cut_off else "stop")
        return {"prompt_id": job.key, "prompt": job.data["prompt"], "thoughts": th, "answer": answer,
                "completion": completion,
                "kept": why is None, "dropped": why, "finish_reason": answer_completion.finish_reason}

    jobs = [Job(pid, principle_prompt(context, p), {"prompt": p}) for pid, p in prompts]
    rows = generate_rows(ctx, store, stage="self_align", label=config.label, model=model, sampling=sampling, jobs=jobs,
                         build_row=build_row, meta=ctx.provenance(config, model, sampling), produce=produce,
                         chunk=config.chunk, id_extra=thought_sampling.model_dump()).rows
    dropped = Counter(r["dropped"] for r in rows if not r["kept"])
    summary = {"prompts": len(prompts), "kept": sum(r["kept"] for r in rows), "dropped": dict(dropped),
               "context_words": len(context.split())}
    console.print(f"  kept {summary['kept']} of {len(rows)} answers; dropped: {dict(dropped) or 'none'}")
    store.mark_done(**summary)
    return summary

