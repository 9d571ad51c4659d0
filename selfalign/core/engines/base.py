"""The one interface every stage and evaluation uses to generate and score text.

An engine wraps one model. `generate` turns requests (a plain prompt or a chat) into
completions; `score` gives the summed log-probability of each continuation after a context,
which is all multiple-choice evaluations and likelihood filters need. Engines differ only in
where the model runs: `hf` (transformers, in-process), `vllm` (vLLM on a GPU or its CPU build, optional extra) and
`openai` (any OpenAI-compatible server).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from selfalign.core.chat import PLAIN_STOPS, Request, is_chat, render


class Sampling(BaseModel):
    """How to sample. `temperature: 0` means greedy decoding."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(1, ge=1, description="completions per request")
    temperature: float = Field(1.0, ge=0.0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    max_new_tokens: int = Field(128, ge=1, description="most tokens generated per completion")
    stop: list[str] = Field(default_factory=list, description="strings that end a completion (not included)")
    seed: int = Field(0, description="random seed; each sample's stream is derived from it, the prompt and its index")
    repetition_penalty: float = Field(1.0, gt=0.0, description="1.0 means none (HF/vLLM semantics)")


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (stop string or end of text) or "length"
    completion_tokens: int  # tokens of `text`: what the row kept
    prompt_tokens: int = 0
    stop_string: str | None = None  # the stop string that ended it, where the engine can tell
    discarded_tokens: int = 0  # generated but not kept (a stop string's tokens, end of text): visible waste


class Engine(ABC):
    """Base class: subclasses implement `_generate_batches` and `score_many`."""

    name: str = "engine"

    def __init__(self, model_ref: str, chat_format: str = "plain"):
        self.model_ref = model_ref
        self.chat_format = chat_format

    # -- generation ----------------------------------------------------------------------------
    @abstractmethod
    def generate_iter(
        self, requests: Sequence[Request], sampling: Sampling
    ) -> Iterator[list[tuple[int, list[Completion]]]]:
        """Yield batches as they finish: a list of (request index, its n completions)."""

    def generate(self, requests: Sequence[Request], sampling: Sampling) -> list[list[Completion]]:
        """Completions for every request, in request order (n per request)."""
        out: list[list[Completion] | None] = [None] * len(requests)
        for batch in self.generate_iter(requests, sampling):
            for i, comps in batch:
                out[i] = comps
        return out  # type: ignore[return-value]

    def render(self, request: Request) -> str:
        """The text a request becomes: a prompt as it is, a chat in the engine's chat format."""
        if not is_chat(request):
            return request
        return render(request, getattr(self, "tokenizer", None), self.chat_format)

    def stops_for(self, request: Request, sampling: Sampling) -> list[str]:
        """The sampling's stops, plus the user-turn marker for chats in the plain format."""
        stops = list(sampling.stop)
        if is_chat(request) and self.chat_format == "plain":
            stops += [s for s in PLAIN_STOPS if s not in stops]
        return stops

    # -- scoring -------------------------------------------------------------------------------
    @abstractmethod
    def score_many(self, items: Sequence[tuple[Request, Sequence[str]]]) -> list[list[float]]:
        """For each (context, continuations): the summed log-probability of each continuation."""

    def score(self, context: Request, continuations: Sequence[str]) -> list[float]:
        return self.score_many([(context, continuations)])[0]

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model or connections."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def score_token_rows(engine, items: Sequence[tuple[Request, Sequence[str]]],
                     limit: int | None) -> list[tuple[list[int], int]]:
    """Token ids of every (context + continuation) and the continuation's length, for engines that
    tokenize locally (hf, vllm). The continuation is the tail of encode(context + continuation)
    (lm-eval's rule), or encoded apart when the tokenizer merges across the boundary. Rows longer
    than `limit` lose tokens from the left."""
    tok = engine.tokenizer
    rows = []
    for context, continuations in items:
        ctx_text = engine.render(context)
        for cont in continuations:
            ctx, cont = split_context(ctx_text, cont)
            ctx_ids = list(tok(ctx, add_special_tokens=True)["input_ids"])
            whole = list(tok(ctx + cont, add_special_tokens=True)["input_ids"])
            if not ctx_ids:  # no BOS and no context: condition on EOS, as lm-eval does
                ctx_ids = [tok.eos_token_id]
                whole = ctx_ids + whole
            n_cont = len(whole) - len(ctx_ids)
            if n_cont <= 0 or whole[: len(ctx_ids)] != ctx_ids:
                cont_ids = list(tok(cont, add_special_tokens=False)["input_ids"])
                whole, n_cont = ctx_ids + cont_ids, len(cont_ids)
            if limit:
                whole = whole[-limit:]
            rows.append((whole, min(n_cont, len(whole) - 1)))
    return rows


def split_context(context: str, continuation: str) -> tuple[str, str]:
    """Move trailing whitespace of the context onto the continuation (lm-eval's convention),
    so that "Answer:" + " yes" tokenizes the way the model saw such text in training."""
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation
