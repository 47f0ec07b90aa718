"""The engine's multimodal path on the tiny Gemma 3n + gemma3nv projector: image chunks evaluated from memory,
their KV kept while the image is the same, the projector released and loaded again, clean errors."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from agent.config import ModelConfig
from agent.contract.codes import AgentError
from agent.llm import llama_shim
from agent.llm.local import LocalModel
from agent.turns.types import Media, Request, Turn
from tests.support import models as testmodels
from tests.support.models_gemma4 import tiny_gemma4_projector


@pytest.fixture(scope="module")
def model() -> Iterator[LocalModel]:
    m = LocalModel(ModelConfig(path=str(testmodels.tiny_text()), mmproj=str(testmodels.tiny_vision_projector()),
                          temperature=0.0, max_tokens=6, n_ctx=2048))
    yield m
    m.release_projector()
    m.close()


def picture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (512, 512, 3), dtype=np.uint8)


def test_an_image_is_256_tokens_and_its_kv_is_reused_while_unchanged(model: LocalModel) -> None:
    image = picture(1)
    first = model.generate(Request(text="What is this?", media=[Media("image", image)]))
    assert first.image_tokens == 256 and first.prompt_tokens > 256
    again = model.generate(Request(text="What is this?", media=[Media("image", image.copy())]))
    assert again.cached_tokens == again.prompt_tokens - 1 and again.text == first.text
    other = model.generate(Request(text="What is this?", media=[Media("image", picture(2))]))
    # only what comes before the image is kept: a different image, and all after it, are evaluated afresh
    assert other.cached_tokens <= other.prompt_tokens - 256 - len(model.tokenize("What is this?"))
    text_only = model.generate(Request(text="And now without a picture?"))
    assert text_only.image_tokens == 0


def test_read_only_frames_are_accepted(model: LocalModel) -> None:
    image = picture(3)
    image.flags.writeable = False
    assert model.generate(Request(text="Hi", media=[Media("image", image)])).image_tokens == 256


def test_bad_images_are_refused_cleanly(model: LocalModel) -> None:
    with pytest.raises(AgentError) as err:
        model.generate(Request(text="Hi", media=[Media("image", np.zeros((10, 10), np.uint8))]))
    assert err.value.code == "projector_error" and "HxWx3" in err.value.detail
    with pytest.raises(AgentError) as err:
        model.generate(Request(text="Hi", media=[Media("audio", np.zeros(1600, np.int16))]))
    assert "cannot take audio" in err.value.detail


def test_projector_release_and_reload(model: LocalModel) -> None:
    model.projector()
    assert model.release_projector() and not model.projector_loaded
    assert model.generate(Request(text="Hi", media=[Media("image", picture(4))])).image_tokens == 256
    assert model.projector_loaded


@pytest.mark.parametrize(("text", "seed"), [("What is at the front door?", None), ("Describe it.", 1)],
                         ids=["text", "picture"])
def test_a_follow_up_finds_the_answer_it_follows_in_the_kv_cache(model: LocalModel, text: str,
                                                                 seed: int | None) -> None:
    """Re-tokenized from its text, the random model's answer to these questions is cut into other tokens than it
    produced (the blank the turn format puts before it joins its first word; after this picture, 5 of its tokens
    would miss): put back as produced, the exchange stays in the KV cache and a follow-up evaluates only its own
    words, after a picture or not; and so does the next one, whose prompt carries both answers."""
    media = () if seed is None else (Media("image", picture(seed)),)
    question = Turn("user", text, media)
    first = model.generate(Request(text=question.text), turns=[question])
    held = first.prompt_tokens + first.completion_tokens - 1  # the last token produced is never evaluated
    turns = [question, Turn("model", first.text.strip()), Turn("user", "And then?")]
    if seed is None:
        assert model.cached_prefix(model.tokenize(model.render(turns))) < held  # re-spelled, the cache would miss
    follow = model.generate(Request(text="And then?"), turns=turns)
    assert follow.cached_tokens == held and follow.prompt_tokens - held < 12
    turns = [*turns, Turn("model", follow.text.strip()), Turn("user", "Who?")]  # both answers, as produced
    third = model.generate(Request(text="Who?"), turns=turns)
    assert third.cached_tokens == follow.prompt_tokens + follow.completion_tokens - 1


@pytest.mark.parametrize("projector", ["gemma3nv", "gemma4v"])
def test_a_follow_up_on_a_cached_picture_needs_no_projector(projector: str) -> None:
    """A follow-up about the picture the KV cache holds is cut from the previous prompt's pieces: the projector is
    not loaded (under an on-demand plan that was half of a follow-up's time), and the tokens are exactly the ones
    libmtmd makes of the same prompt. A new picture, or a cache that lost the old one, goes through libmtmd."""
    path = testmodels.tiny_vision_projector() if projector == "gemma3nv" else tiny_gemma4_projector()
    m = LocalModel(ModelConfig(path=str(testmodels.tiny_text()), mmproj=str(path), temperature=0.0, max_tokens=6,
                               n_ctx=2048))
    try:
        shown = Turn("user", "What is this?", (Media("image", picture(7)),))
        first = m.generate(Request(text=shown.text), turns=[shown])
        m.release_projector()
        turns = [shown, Turn("model", first.text), Turn("user", "Is it red?")]
        follow = m.generate(Request(text="Is it red?"), turns=turns)
        assert not m.projector_loaded and follow.projector_load_ms == 0 and follow.encode_ms == 0
        assert follow.image_tokens == first.image_tokens and follow.cached_tokens > first.prompt_tokens
        cut = m._media_prompt(turns, None)  # again from the pieces ...
        m._tokenized = None
        made = m._media_prompt(turns, None)  # ... and by libmtmd, which loads the projector
        assert m.projector_loaded and cut.tokens == made.tokens
        made.close()
        m.release_projector()
        llama_shim.keep_prefix(m.llm, 0)  # the cache lost the picture: libmtmd cuts it, and it is encoded again
        again = m.generate(Request(text="Is it red?"), turns=turns)
        assert again.encode_ms > 0 and again.image_tokens == first.image_tokens
    finally:
        m.close()


def test_a_model_without_projector_refuses_images() -> None:
    plain = LocalModel(ModelConfig(path=str(testmodels.tiny_text()), max_tokens=4, n_ctx=512, n_batch=256,
                              n_ubatch=256))
    with pytest.raises(AgentError) as err:
        plain.generate(Request(text="Hi", media=[Media("image", picture(5))]))
    assert err.value.code == "no_projector"
    plain.close()


def test_gguf_chat_template_is_used_when_present() -> None:
    templated = LocalModel(ModelConfig(path=str(testmodels.tiny_text(template=True)), max_tokens=4, n_ctx=512,
                                  n_batch=256, n_ubatch=256, system_prompt="Be brief."))
    assert templated.template is not None
    from agent.turns.types import Turn

    rendered = templated.render([Turn("user", "Hello")])
    assert rendered.startswith("<bos><start_of_turn>user\n") and rendered.endswith("<start_of_turn>model\n")
    assert "Be brief." in rendered and "Hello" in rendered
    assert templated.generate(Request(text="Hello")).completion_tokens > 0
    templated.close()
