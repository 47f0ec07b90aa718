"""Gemma chat formatting: a conversation becomes the exact prompt text the model reads.

Gemma has no system role: the system prompt opens the first user turn. The rendering is prefix-stable (the
system prompt and earlier turns render to the same text whatever follows), so the engine reuses their KV cache
and a new question pays only for its own tokens. A GGUF's own chat template, when present, is rendered only
in Jinja's immutable sandbox: a template is data from a file, not code we trust.
"""

from __future__ import annotations

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from agent.turns.types import Turn

START, END = "<start_of_turn>", "<end_of_turn>"


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
