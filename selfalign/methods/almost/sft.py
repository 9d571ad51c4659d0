"""`sft`: supervised fine-tuning on the self-play demonstrations (ALMoST, Kim et al. 2023, step 2).

The conversations that reward-model-guided self-play wrote (`self_play` rows: `messages`, the best
reply at every assistant turn) are the demonstrations; the model (`model:`, default the recipe's
vanilla model) is fine-tuned on them with the loss on the assistant turns only. Each example is the
plain transcript up to an assistant turn and that turn's reply:

    [system]\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant:   →   " <reply><eos>"

Paper settings, the defaults here: full fine-tuning, lr 2e-5, 3 epochs, max length 512. The system
prompt at training is none by default (`system`): the self-play assistant's system prompt is what
the demonstrations should make unnecessary. `lora: true` trains a LoRA adapter instead (r 16,
alpha 16, dropout 0.05, as Self-Align's), which is what a CPU can afford for larger models.

Output: `examples.jsonl` (exactly what was trained on: conversation id, turn, prompt, completion),
`model/` (or `adapter/`), `trainer_state.json`, and the done-marker whose `model` a later stage
(`rlsf`'s `model: "@sft"`) loads.

Simplifications: a conversation with k assistant turns becomes k examples, each with the
dialogue so far as its prompt (`selfalign.core.training`'s one-example-per-turn rule: the same gradient
as one masked sequence up to how turns are weighted); a prompt longer than `max_length` loses
tokens from the left, a reply that alone is too long is dropped; warmup (3%), batch size (4) and
the schedule (linear decay) are not published and are fields; a killed run trains again from the
start.
"""

from __future__ import annotations

from pydantic import Field

from selfalign.core.recipe import StageConfig
from selfalign.core.store import row_id
from selfalign.core.supervised import kept_rows, train_on_examples, training_rows
from selfalign.core.training import TrainSettings
from selfalign.evals.common import resolve_system
from selfalign.methods.almost.rloo import policy_prompt


class Config(StageConfig):
    stage: str = "sft"
    data: str = Field(
        "self_play", description="an earlier stage's name (its rows.jsonl) or a JSONL file of rows with `messages`"
    )
    system: str | None = Field(
        None, description="system prompt at training (default none): text, a .txt file, hhh or builtin:NAME"
    )
    train: TrainSettings = Field(default_factory=lambda: TrainSettings(lora=False, lr=2e-5, epochs=3.0, max_length=512),
                                 description="how the model is fine-tuned (the paper's: all weights, lr 2e-5, "
                                             "3 epochs, max length 512 tokens of dialogue so far + reply)")
    max_conversations: int | None = Field(None, ge=1, description="train on at most the first N kept conversations")

    def human_inputs(self) -> list[tuple[str, str]]:
        return [(self.system, resolve_system(self.system) or "")] if self.system else []


def turn_examples(messages: list[dict], system: str | None = None) -> list[tuple[int, str, str]]:
    """(turn, prompt, completion) for every assistant turn: the dialogue before it, and " " + its reply.
    The trainer appends the EOS token."""
    out = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and i > 0 and str(m["content"]).strip():
            out.append((sum(x["role"] == "assistant" for x in messages[:i]) + 1,
                        policy_prompt(messages[:i], system), " " + str(m["content"]).strip()))
    return out


def conversations(rows: list[dict]) -> tuple[list[dict], dict]:
    """Rows with a dialogue holding an assistant turn and not rejected (`kept: false`); counts of the rest."""
    return kept_rows(rows, lambda r: any(m.get("role") == "assistant" and str(m.get("content") or "").strip()
                                         for m in r.get("messages") or []), "no assistant turn")


def run(ctx, config: Config, folder) -> dict:
    system = resolve_system(config.system)
    source, rows, skipped = training_rows(ctx, config.data, conversations, config.max_conversations,
                                          "no conversation to train on (rows need `messages` with an assistant turn, "
                                          "and kept not false)")
    examples = []
    for r in rows:
        cid = r.get("id") or row_id("conversation", r["messages"])
        for turn, prompt, completion in turn_examples(r["messages"], system):
            examples.append({"id": row_id("sft", cid, turn), "conversation_id": cid, "turn": turn,
                             "prompt": prompt, "completion": completion})
    note = (f"  {len(examples)} assistant turns from {len(rows)} conversations in {source} "
            f"({skipped['not kept']} not kept, {skipped['no assistant turn']} without an assistant turn)")
    return train_on_examples(ctx, config, examples, folder, note, data=str(source), conversations=len(rows),
                             skipped=skipped)
