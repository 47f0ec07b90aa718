"""Tiny random-weight Gemma 4 files for the tests (a text model and its vision + audio projector), generated once
into the test model cache (tests/support/models.py: named after a hash of the generators' sources and
parameters, written atomically)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tests.support import models, synth, synth_gemma4, synth_gemma4v

_SOURCES = hashlib.sha256(b"".join(Path(str(m.__file__)).read_bytes()
                                   for m in (synth_gemma4, synth_gemma4v))).hexdigest()


def tiny_gemma4_text(template: bool = False) -> Path:
    """Tiny Gemma 4 text model (4 layers, KV sharing, n_embd 32, the Gemma 3 vocabulary), optionally with the
    plain-turn Gemma 4 chat template."""
    tokenizer = models.gemma3_tokenizer()
    shape = synth_gemma4.GEMMA4_TINY
    params = {"sources": _SOURCES, "shape": repr(shape), "template": template, "tokenizer": tokenizer.name}
    return models._cached("gemma4-tiny" + ("-template" if template else ""), ".gguf", params,
                          lambda p: synth_gemma4.write_gemma4_text(p, shape, tokenizer, chat_template=template))


def tiny_gemma4_projector() -> Path:
    """Tiny combined gemma4v + gemma4a projector (n_embd 32: pairs with tiny_gemma4_text() and models.tiny_text())."""
    params = {"sources": _SOURCES, "vision": repr(synth_gemma4v.TINY_V), "audio": repr(synth_gemma4v.TINY_A),
              "n_embd": synth.TINY.n_embd, "qtype": "F16"}
    return models._cached("gemma4va-tiny", ".gguf", params,
                          lambda p: synth_gemma4v.write_gemma4_projector(p, synth.TINY.n_embd))
