"""Prompt formats: a conversation becomes the exact text the model reads.

- chat: an instruction-tuned model's turns. The GGUF's own chat template when it has one, rendered only in Jinja's
  immutable sandbox (a template is data from a file, not code we trust); else Gemma's turn format, where the
  system prompt opens the first user turn (Gemma has no system role).
- completion: a base model (Gemma 3 270M, the demo's) follows no turns; it continues text. It gets a short
  question-and-answer transcript ending in "A:", and the engine stops at the end of that line, so the answer is
  one sentence instead of an echo of the system prompt and tokens until max_tokens.

Every format is prefix-stable (the system prompt and earlier turns render to the same text whatever follows), so
the engine reuses their KV cache and a new question pays only for its own tokens.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from agent.turns.types import Turn

START, END = "<start_of_turn>", "<end_of_turn>"
EXAMPLES = (("What is the capital of France?", "Paris is the capital of France."),
            ("How many legs does a spider have?", "A spider has eight legs."))
_INSTRUCT = re.compile(r"(^|[^a-z0-9])(it|instruct|chat)([^a-z0-9]|$)", re.IGNORECASE)


class TemplateProblem(Exception):
    """The GGUF's chat template cannot be rendered."""


def gemma_prompt(system: str, turns: list[Turn], bos: str = "<bos>") -> str:
    """Render Gemma's turn format, ending with an open model turn."""
    parts = [bos]
    for i, turn in enumerate(turns):
        text = f"{system}\n\n{turn.text}" if i == 0 and system and turn.role == "user" else turn.text
        parts.append(f"{START}{turn.role}\n{text}{END}\n")
    parts.append(f"{START}model\n")
    return "".join(parts)


def completion_prompt(system: str, turns: list[Turn], bos: str = "<bos>") -> str:
    """A Q/A transcript for a base model, ending with an open "A:" (each turn on one line)."""
    parts = [bos + (f"{system.strip()}\n\n" if system.strip() else "")]
    parts += [f"Q: {q}\nA: {a}\n\n" for q, a in EXAMPLES]
    for turn in turns:
        text = " ".join(turn.text.split())
        parts.append(f"Q: {text}\n" if turn.role == "user" else f"A: {text}\n\n")
    parts.append("A:")
    return "".join(parts)


Format = Literal["chat", "completion"]


def prompt_format(configured: str, metadata: Mapping[str, Any]) -> tuple[Format, str]:
    """The format a model is prompted in and why: model.prompt_format, or for `auto` chat when the GGUF has a chat
    template or its name says it is instruction-tuned (-it, instruct, chat), else completion (a base model)."""
    if configured in ("chat", "completion"):
        return ("chat" if configured == "chat" else "completion"), f"model.prompt_format is {configured}"
    if metadata.get("tokenizer.chat_template"):
        return "chat", "the GGUF has a chat template"
    names = " ".join(str(metadata.get(k, "")) for k in ("general.name", "general.finetune", "general.basename"))
    if _INSTRUCT.search(names):
        return "chat", f"an instruction-tuned model ({names.strip()}) without a template: Gemma turns"
    return "completion", "a base model (no chat template, not instruction-tuned): question-and-answer completion"


class ChatTemplate:
    """A GGUF `tokenizer.chat_template`, compiled once in a sandbox."""

    def __init__(self, source: str, bos: str, eos: str) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise TemplateProblem(f"chat template does not compile: {exc}") from None
        self._bos, self._eos = bos, eos

    def render(self, system: str, turns: list[Turn]) -> str:
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": "assistant" if t.role == "model" else "user", "content": t.text} for t in turns]
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=True, bos_token=self._bos, eos_token=self._eos
            )
        except (TemplateError, TypeError, ValueError) as exc:
            raise TemplateProblem(f"chat template failed to render: {exc}") from None


def _raise(message: str) -> None:
    raise TemplateError(message)
