"""A conversation with an instruction-tuned model, kept inside its context window.

Each turn is written the way the model was finetuned (tasks/prompts.py: Alpaca's preamble,
`### Instruction:`, `### Response:`), the reply followed by `<|endoftext|>` as in training;
earlier turns come first, so a reply can refer to them. The model sees at most
`context_length` tokens, of which `max_new_tokens` are kept free for the reply: when the
turns no longer fit, the oldest are dropped (for good: the conversation says how many), and
a message too long on its own keeps its last tokens, where the response header is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from minigpt.tasks.prompts import format_prompt
from minigpt.tokenizer import EOT_ID, get_tokenizer


@dataclass
class Conversation:
    """The turns so far, as token ids, and the budget they must fit."""

    context_length: int
    max_new_tokens: int
    turns: list[list[int]] = field(default_factory=list)  # each: prompt + reply + <|endoftext|>

    def __post_init__(self) -> None:
        if self.max_new_tokens >= self.context_length:
            raise ValueError(f"max_new_tokens {self.max_new_tokens} leaves no room for a message in the "
                             f"model's context_length {self.context_length}")

    @property
    def room(self) -> int:
        """Tokens the context may hold before the reply."""
        return self.context_length - self.max_new_tokens

    def prompt(self, message: str) -> tuple[list[int], int, bool]:
        """The model's input for `message`: the earlier turns that fit, then its prompt. Also
        how many of the oldest turns were dropped to make it fit, and whether the message
        itself was cut."""
        ids = get_tokenizer().encode_ordinary(format_prompt({"instruction": message}))
        cut = len(ids) > self.room
        ids = ids[-self.room:]
        dropped = 0
        while self.turns and sum(map(len, self.turns)) + len(ids) > self.room:
            self.turns.pop(0)
            dropped += 1
        return [token for turn in self.turns for token in turn] + ids, dropped, cut

    def add(self, prompt_ids: list[int], reply: str) -> None:
        """Remember a finished turn: the prompt as the model saw it (its own part only), the reply."""
        earlier = sum(map(len, self.turns))
        self.turns.append(prompt_ids[earlier:] + get_tokenizer().encode_ordinary(reply) + [EOT_ID])

    def reset(self) -> None:
        self.turns.clear()
