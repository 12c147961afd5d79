"""What the simulator says: prompt-token counting, reply planning, the classifier and SSE bytes.

Everything here is pure and deterministic (no I/O, no clock, no globals mutated) so the
simulator's answers can be asserted exactly in tests, and cheap, because the simulator is the
"direct upstream" that the gateway's overhead is measured against.

Token model (an approximation, documented because tests and quotas depend on it):
- prompt tokens = for each message, 4 (role and framing) + the number of whitespace-separated
  words in its text content (string content, or the ``text`` of ``{"type": "text"}`` parts);
- a completion token is one word of the reply (the first one is the ``[plateforme-sim]`` marker).

Reply length: the simulated model "naturally" ends (finish_reason ``stop``) after
``reply_tokens`` tokens; ``max_tokens`` below that truncates (finish_reason ``length``);
``ignore_eos`` generates exactly ``max_tokens`` (or ``reply_tokens``), capped at
``MAX_GENERATED_TOKENS``, with finish_reason ``length`` as vLLM does. A ``stop`` string found in
the text truncates it there (finish_reason ``stop``, the stop string excluded).

Classifier trigger table (case-insensitive, matched at a word start, so "killing" matches "kill"
but "skill" does not); a category is flagged when any of its triggers occurs in the LAST user
message:

| category      | triggers                                                              |
| ------------- | --------------------------------------------------------------------- |
| physical_harm | bomb, kill, weapon, explosive, murder, shoot                          |
| economic_harm | steal money, ransom, embezzle, launder, extort                        |
| fraud         | scam, phishing, fraud, counterfeit, fake invoice                      |
| sexual        | porn, explicit sex, nude, sexual content                              |
| hate          | hate speech, racist, slur, inferior race                              |
| self_harm     | suicide, self-harm, self harm, hurt myself, kill myself               |

Scores are 0.97 for a flagged category and 0.01 otherwise; ``flagged`` is any category flagged.
Categories are independent: "kill myself" flags self_harm and, through "kill", physical_harm.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Final

import orjson

SIM_MARKER: Final = "[plateforme-sim]"
MAX_GENERATED_TOKENS: Final = 8192
PER_MESSAGE_TOKENS: Final = 4
CLASSIFIER_PIECE_CHARS: Final = 8  # one "token" of a classifier reply, for streaming and usage

_VOCABULARY: Final = (
    "simulated tokens stream from a local endpoint that behaves like vLLM with configurable "
    "latency queueing and failures so the gateway can be developed and measured without any "
    "GPU mixture experts route each token through two of eight feed forward blocks"
).split()

CLASSIFIER_TRIGGERS: Final[dict[str, tuple[str, ...]]] = {
    "physical_harm": ("bomb", "kill", "weapon", "explosive", "murder", "shoot"),
    "economic_harm": ("steal money", "ransom", "embezzle", "launder", "extort"),
    "fraud": ("scam", "phishing", "fraud", "counterfeit", "fake invoice"),
    "sexual": ("porn", "explicit sex", "nude", "sexual content"),
    "hate": ("hate speech", "racist", "slur", "inferior race"),
    "self_harm": ("suicide", "self-harm", "self harm", "hurt myself", "kill myself"),
}
CLASSIFIER_CATEGORIES: Final = tuple(CLASSIFIER_TRIGGERS)
_TRIGGER_PATTERNS: Final = {
    name: re.compile(r"\b(?:" + "|".join(re.escape(t) for t in triggers) + ")", re.IGNORECASE)
    for name, triggers in CLASSIFIER_TRIGGERS.items()
}
FLAGGED_SCORE: Final = 0.97
CLEAN_SCORE: Final = 0.01
CLASSIFIER_GARBAGE: Final = "Sure! I think this message is probably fine {flagged: maybe"


@dataclass(frozen=True)
class ReplyPlan:
    """The whole reply decided before any token is sent: pieces of text and why it ended."""

    pieces: tuple[str, ...]
    finish_reason: str  # "stop" | "length"

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def message_text(message: Any) -> str:
    """The text of one chat message; non-text parts (images, tool calls) count as nothing."""
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def count_prompt_tokens(messages: list[Any]) -> int:
    """Cheap, deterministic prompt-token approximation (see the module docstring)."""
    return sum(PER_MESSAGE_TOKENS + len(message_text(m).split()) for m in messages)


def last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return message_text(message)
    return ""


def classify(text: str) -> dict[str, Any]:
    """The classification a moderation model would answer for ``text`` (see the table)."""
    categories = {name: bool(p.search(text)) for name, p in _TRIGGER_PATTERNS.items()}
    scores = {name: FLAGGED_SCORE if hit else CLEAN_SCORE for name, hit in categories.items()}
    return {"flagged": any(categories.values()), "categories": categories, "scores": scores}


def chat_words(model: str, seed: int | str, prompt: str, count: int) -> list[str]:
    """``count`` reply tokens: the marker, a sentence saying what this is, then seeded words."""
    intro = [SIM_MARKER, " simulated", " reply", " from", f" {model}."]
    words = intro[:count]
    if count > len(intro):
        rng = random.Random(f"{seed}\x00{prompt}")
        words.extend(" " + rng.choice(_VOCABULARY) for _ in range(count - len(intro)))
    return words


def split_pieces(text: str) -> list[str]:
    return [text[i : i + CLASSIFIER_PIECE_CHARS] for i in range(0, len(text), CLASSIFIER_PIECE_CHARS)]


def apply_stop(pieces: list[str], stops: list[str]) -> tuple[list[str], bool]:
    """Truncate at the earliest stop string (excluded); return the pieces and whether it hit."""
    text = "".join(pieces)
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    if cut < 0:
        return pieces, False
    kept: list[str] = []
    used = 0
    for piece in pieces:
        if used + len(piece) >= cut:
            if cut > used:
                kept.append(piece[: cut - used])
            break
        kept.append(piece)
        used += len(piece)
    return kept, True


def plan_reply(
    *,
    model: str,
    messages: list[Any],
    max_tokens: int | None,
    ignore_eos: bool,
    stop: list[str],
    seed: int | str,
    reply_tokens: int,
    classifier: bool,
    classifier_garbage: bool,
) -> ReplyPlan:
    """Decide the reply to a chat request (content pieces and finish reason)."""
    if classifier:
        content = (
            CLASSIFIER_GARBAGE
            if classifier_garbage
            else orjson.dumps(classify(last_user_text(messages))).decode()
        )
        natural = split_pieces(content)
    else:
        wanted = reply_tokens
        if ignore_eos:
            wanted = max_tokens if max_tokens is not None else reply_tokens
        wanted = min(wanted, MAX_GENERATED_TOKENS)
        natural = chat_words(model, seed, last_user_text(messages), wanted)
        if ignore_eos:
            return ReplyPlan(tuple(natural), "length")
    pieces, stopped = apply_stop(natural, stop)
    if stopped and (max_tokens is None or len(pieces) <= max_tokens):
        return ReplyPlan(tuple(pieces), "stop")
    if max_tokens is not None and max_tokens < len(natural):
        return ReplyPlan(tuple(natural[:max_tokens]), "length")
    return ReplyPlan(tuple(natural), "stop")


class ChunkEncoder:
    """Pre-encoded SSE frames for one streamed reply: per token, only the content is encoded."""

    def __init__(self, completion_id: str, created: int, model: str) -> None:
        head = orjson.dumps(
            {"id": completion_id, "object": "chat.completion.chunk", "created": created,
             "model": model}
        )[:-1]
        self._head = b"data: " + head
        self._content_prefix = self._head + b',"choices":[{"index":0,"delta":{"content":'
        self._content_suffix = b'},"logprobs":null,"finish_reason":null}]}\n\n'

    def role(self) -> bytes:
        return (self._head + b',"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
                b'"logprobs":null,"finish_reason":null}]}\n\n')

    def content(self, piece: str) -> bytes:
        return self._content_prefix + orjson.dumps(piece) + self._content_suffix

    def finish(self, finish_reason: str) -> bytes:
        return (self._head + b',"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":'
                + orjson.dumps(finish_reason) + b',"stop_reason":null}]}\n\n')

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        return self._head + b',"choices":[],"usage":' + orjson.dumps(usage) + b"}\n\n"


SSE_DONE: Final = b"data: [DONE]\n\n"
