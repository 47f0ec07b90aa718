"""LoRA adapters: a GGUF LoRA for the tiny Gemma 3n changes what the model says, keeps mmap, and a file that is
not an adapter for this model is refused before llama.cpp sees it."""

from __future__ import annotations

import dataclasses

import llama_cpp
import pytest

from agent.config import Config, ModelConfig
from agent.gguf import ModelFileError
from agent.llm.loader import load_model
from agent.llm.local import LocalModel
from agent.turns.types import Request
from tests.support import models as testmodels


def answer(lora: str = "", scale: float = 1.0) -> tuple[str, LocalModel]:
    model = LocalModel(ModelConfig(path=str(testmodels.tiny_text()), lora=lora, lora_scale=scale, temperature=0.0,
                              max_tokens=12, n_ctx=512, n_batch=256, n_ubatch=256))
    text = model.generate(Request(text="Tell me something.")).text
    return text, model


def test_adapter_changes_the_output_and_keeps_mmap() -> None:
    base, plain = answer()
    plain.close()
    adapted, model = answer(str(testmodels.tiny_lora()), 4.0)
    assert model.llm.model_params.load_mode == llama_cpp.LLAMA_LOAD_MODE_MMAP
    model.close()
    neutral, zero = answer(str(testmodels.tiny_lora()), 0.0)
    zero.close()
    assert adapted != base and neutral == base


def test_a_file_that_is_not_an_adapter_for_this_model_is_refused() -> None:
    cfg = Config()
    cfg.model = dataclasses.replace(cfg.model, path=str(testmodels.tiny_text()),
                                    lora=str(testmodels.tiny_vision_projector()))
    with pytest.raises(ModelFileError, match="not a LoRA adapter for gemma3n"):
        load_model(cfg)
