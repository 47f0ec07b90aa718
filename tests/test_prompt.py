"""Gemma chat formatting: the built-in turn format and a GGUF template rendered in a sandbox."""

from __future__ import annotations

import pytest

from agent.llm.prompt import ChatTemplate, TemplateProblem, gemma_prompt
from agent.turns.types import Turn

pytestmark = pytest.mark.fast

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{% set ns = m['content'] %}"
    "{% else %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ m['content'] | trim }}"
    "<end_of_turn>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def test_builtin_format_puts_system_prompt_in_first_user_turn() -> None:
    text = gemma_prompt("Be brief.", [Turn("user", "Hi"), Turn("model", "Hello"), Turn("user", "Bye")])
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    )


def test_builtin_format_is_prefix_stable() -> None:
    one = gemma_prompt("S", [Turn("user", "first question")])
    two = gemma_prompt("S", [Turn("user", "a different one")])
    common = "<bos><start_of_turn>user\nS\n\n"
    assert one.startswith(common) and two.startswith(common)


def test_template_renders_messages() -> None:
    template = ChatTemplate(GEMMA_TEMPLATE, "<bos>", "<eos>")
    expected = "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert template.render("", [Turn("user", "Hi")]) == expected


def test_template_is_sandboxed() -> None:
    hostile = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(TemplateProblem):
        ChatTemplate(hostile, "<bos>", "<eos>").render("", [Turn("user", "x")])


def test_template_cannot_mutate_its_inputs() -> None:
    template = ChatTemplate("{{ messages.append(1) }}", "<bos>", "<eos>")
    with pytest.raises(TemplateProblem):
        template.render("", [Turn("user", "x")])


def test_template_raise_exception_and_syntax_errors() -> None:
    with pytest.raises(TemplateProblem, match="no system role"):
        ChatTemplate("{{ raise_exception('no system role') }}", "", "").render("s", [Turn("user", "x")])
    with pytest.raises(TemplateProblem, match="does not compile"):
        ChatTemplate("{% for %}", "", "")
