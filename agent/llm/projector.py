"""A multimodal projector (mmproj GGUF) through libmtmd: images and audio become chunks of the prompt.

One libmtmd context per projector, bound to the loaded text model. Images go in as RGB bitmaps built from memory
(no temp files, no JPEG round trip); audio as float PCM at the projector's sample rate. `Projector.prompt()` cuts
a prompt with media markers into text tokens and media chunks; the engine evaluates them in order and keeps the
KV cache of what did not change (the system prompt, and a media chunk whose content is identical).
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.turns.types import Media

log = logging.getLogger("agent.llm.projector")
CHUNK_TEXT, CHUNK_IMAGE, CHUNK_AUDIO = 0, 1, 2  # mtmd_input_chunk_type


class ProjectorError(Exception):
    """The projector cannot be loaded, or cannot take this input."""


@dataclass
class Piece:
    """A run of the prompt: text tokens, or one media chunk standing for `n_pos` positions."""

    tokens: list[int]  # text tokens, or [media key] * n_pos for a media chunk
    chunk: Any = None  # the mtmd chunk for media pieces
    kind: str = "text"
    n_tokens: int = 0


class Prompt:
    """A tokenized multimodal prompt; owns the mtmd chunks until close()."""

    def __init__(self, chunks: Any, pieces: list[Piece]) -> None:
        self._chunks = chunks
        self.pieces = pieces

    @property
    def tokens(self) -> list[int]:
        return [t for p in self.pieces for t in p.tokens]

    def media_tokens(self, kind: str) -> int:
        return sum(p.n_tokens for p in self.pieces if p.kind == kind)

    def close(self) -> None:
        from llama_cpp import mtmd_cpp as mtmd

        if self._chunks is not None:
            mtmd.mtmd_input_chunks_free(self._chunks)
            self._chunks = None


@dataclass(frozen=True)
class Tokenized:
    """A media prompt as text and token pieces, without libmtmd's chunks: enough to cut a later prompt that only
    adds text after the last media item (a follow-up question about the same picture) without the projector."""

    text: str  # the rendered prompt, a marker where each media item goes
    keys: tuple[int, ...]  # the media items' content keys, in order
    pieces: tuple[Piece, ...]  # chunk None

    @classmethod
    def of(cls, text: str, keys: tuple[int, ...], pieces: list[Piece]) -> Tokenized:
        return cls(text, keys, tuple(Piece(p.tokens, None, p.kind, p.n_tokens) for p in pieces))

    @property
    def tokens(self) -> list[int]:
        return [t for p in self.pieces for t in p.tokens]

    @property
    def media_end(self) -> int:
        """Tokens up to the end of the last media piece: what the KV cache must hold to skip the projector."""
        last = max(i for i, p in enumerate(self.pieces) if p.kind != "text")
        return sum(len(p.tokens) for p in self.pieces[:last + 1])

    def extended(self, text: str, keys: tuple[int, ...], marker: str,
                 tokenize: Callable[[str], list[int]]) -> Tokenized | None:
        """This prompt's pieces up to its last media item, then `text`'s own tail, when `text` is this prompt's text
        up to the last marker with other text after it, and the same media; None when libmtmd must cut it.

        libmtmd tokenizes the text after a media chunk on its own, after what the projector adds there (Gemma 3's
        <end_of_image>, nothing for others): that addition is learnt from this prompt (its tail piece = addition +
        the plain tokens of its tail text), and checked, so a projector doing anything else falls back."""
        cut = self.text.rfind(marker) + len(marker)
        media = [i for i, p in enumerate(self.pieces) if p.kind != "text"]
        if not keys or keys != self.keys or text[:cut] != self.text[:cut] or media[-1] != len(self.pieces) - 2:
            return None
        after, plain = self.pieces[-1].tokens, tokenize(self.text[cut:])
        if len(plain) > len(after) or after[len(after) - len(plain):] != plain:
            return None
        added = after[:len(after) - len(plain)]
        return Tokenized(text, keys, (*self.pieces[:-1], Piece(added + tokenize(text[cut:]))))


def media_marker() -> str:
    """The text libmtmd replaces with a media chunk (the same for every projector)."""
    from llama_cpp import mtmd_cpp as mtmd

    return str(mtmd.mtmd_default_marker().decode())


@dataclass(frozen=True)
class Encoded:
    """An image's or a clip's embeddings, out of the encoder: (tokens, n_embd) float32."""

    embd: np.ndarray
    n_pos: int  # positions it takes in the context
    non_causal: bool  # its tokens attend to each other both ways (Gemma)
    seconds: float  # the encoder's time


def decode_embeddings(lctx: Any, encoded: Encoded, n_past: int, n_batch: int) -> int:
    """Evaluate encoded image or audio embeddings into the KV cache at n_past (sequence 0), n_batch at a time, the
    way libmtmd's helper does for models without M-RoPE; returns the new n_past."""
    import llama_cpp

    n_tokens, n_embd = encoded.embd.shape
    embd = np.ascontiguousarray(encoded.embd, dtype=np.float32)
    batch = llama_cpp.llama_batch_init(n_batch, n_embd, 1)
    if encoded.non_causal:
        llama_cpp.llama_set_causal_attn(lctx, False)
    try:
        for start in range(0, n_tokens, n_batch):
            n = min(n_batch, n_tokens - start)
            ctypes.memmove(batch.embd, embd[start:start + n].ctypes.data, n * n_embd * 4)
            for i in range(n):
                batch.pos[i] = n_past + start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 0
            batch.n_tokens = n
            rc = llama_cpp.llama_decode(lctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode of the media embeddings failed (code {rc})")
    finally:
        if encoded.non_causal:
            llama_cpp.llama_set_causal_attn(lctx, True)
        llama_cpp.llama_batch_free(batch)
    return n_past + encoded.n_pos


class Projector:
    """An mmproj loaded for a text model (`model`: its llama_model pointer, from llama_shim.model_handle)."""

    def __init__(self, path: str, model: Any, threads: int, use_gpu: bool = False) -> None:
        import llama_cpp
        from llama_cpp import mtmd_cpp as mtmd

        self.mtmd = mtmd
        self.path = path
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = threads
        params.print_timings = False
        params.warmup = False
        self.ctx = mtmd.mtmd_init_from_file(path.encode(), model, params)
        if not self.ctx:
            raise ProjectorError(f"{path}: libmtmd could not load the projector (see the llama.cpp log above; "
                                 "its n_embd must match the text model's)")
        self.vision = bool(mtmd.mtmd_support_vision(self.ctx))
        self.audio = bool(mtmd.mtmd_support_audio(self.ctx))
        self.sample_rate = int(mtmd.mtmd_get_audio_sample_rate(self.ctx)) if self.audio else 0
        self.n_embd = int(llama_cpp.llama_model_n_embd(model))
        log.info("projector loaded: %s (vision %s, audio %s)", path, self.vision, self.audio)

    def prompt(self, text: str, media: list[Media]) -> Prompt:
        """Tokenize `text` (containing one marker per media item, in order) into pieces."""
        mtmd = self.mtmd
        for item in media:
            if item.kind == "image" and not self.vision:
                raise ProjectorError(f"{self.path} has no vision encoder: it cannot take images")
            if item.kind == "audio" and not self.audio:
                raise ProjectorError(f"{self.path} has no audio encoder: it cannot take audio")
        bitmaps = [self._bitmap(item) for item in media]
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            encoded = text.encode()
            source = mtmd.mtmd_input_text()
            source.text, source.text_len = encoded, len(encoded)
            source.add_special, source.parse_special = False, True
            array = (mtmd.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            rc = mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(source), array, len(bitmaps))
            if rc != 0:
                raise ProjectorError(f"libmtmd could not tokenize the prompt (code {rc}: "
                                     "markers and media items must match)")
            return Prompt(chunks, self._pieces(chunks, media))
        except BaseException:
            mtmd.mtmd_input_chunks_free(chunks)
            raise
        finally:
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)

    def _bitmap(self, item: Media) -> Any:
        mtmd = self.mtmd
        if item.kind == "image":
            rgb = np.ascontiguousarray(item.data, dtype=np.uint8)
            if rgb.ndim != 3 or rgb.shape[2] != 3:
                raise ProjectorError(f"an image must be HxWx3 RGB, got shape {rgb.shape}")
            # libmtmd copies the pixels: a pointer into the (possibly read-only) array is enough
            return mtmd.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        pcm = item.data.astype(np.float32) / 32768.0 if item.data.dtype == np.int16 else item.data
        pcm = np.ascontiguousarray(pcm, dtype=np.float32)
        if pcm.ndim != 1 or pcm.size == 0:
            raise ProjectorError("audio must be a non-empty mono clip")
        return mtmd.mtmd_bitmap_init_from_audio(pcm.size, pcm.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))

    def _pieces(self, chunks: Any, media: list[Media]) -> list[Piece]:
        mtmd = self.mtmd
        pieces: list[Piece] = []
        keys = iter([m.key for m in media])
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            kind = mtmd.mtmd_input_chunk_get_type(chunk)
            if kind == CHUNK_TEXT:
                n = ctypes.c_size_t()
                ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                pieces.append(Piece([int(ptr[j]) for j in range(n.value)]))
            else:
                n_pos = int(mtmd.mtmd_input_chunk_get_n_pos(chunk))
                pieces.append(Piece([next(keys)] * n_pos, chunk, "image" if kind == CHUNK_IMAGE else "audio",
                                    int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))))
        return pieces

    def encode(self, piece: Piece) -> Encoded | None:
        """Run the encoder on an image or audio piece and keep its embeddings apart from libmtmd, so the projector
        can be freed before they are evaluated (the on-demand memory plan); None for what `evaluate` must do in
        one call (models with M-RoPE positions, which libmtmd's helper lays out itself)."""
        mtmd = self.mtmd
        if piece.kind == "text" or mtmd.mtmd_decode_use_mrope(self.ctx):
            return None
        began = time.monotonic()
        if mtmd.mtmd_encode_chunk(self.ctx, piece.chunk) != 0:
            raise RuntimeError(f"libmtmd could not encode the {piece.kind}")
        n_tokens = int(mtmd.mtmd_input_chunk_get_n_tokens(piece.chunk))
        out = ctypes.cast(mtmd.mtmd_get_output_embd(self.ctx), ctypes.POINTER(ctypes.c_float))
        embd = np.ctypeslib.as_array(out, shape=(n_tokens * self.n_embd,)).reshape(n_tokens, self.n_embd).copy()
        return Encoded(embd, int(mtmd.mtmd_input_chunk_get_n_pos(piece.chunk)),
                       bool(mtmd.mtmd_decode_use_non_causal(self.ctx, piece.chunk)), time.monotonic() - began)

    def evaluate(self, piece: Piece, lctx: Any, n_past: int, n_batch: int) -> int:
        """Encode a media piece and decode its embeddings at n_past in one libmtmd call; returns the new n_past."""
        new_n_past = ctypes.c_int32(n_past)
        rc = self.mtmd.mtmd_helper_eval_chunk_single(self.ctx, lctx, piece.chunk, n_past, 0, n_batch, False,
                                                     ctypes.byref(new_n_past))
        if rc != 0:
            raise RuntimeError(f"libmtmd could not evaluate the {piece.kind} (code {rc})")
        return int(new_n_past.value)

    def close(self) -> None:
        if self.ctx:
            self.mtmd.mtmd_free(self.ctx)
            self.ctx = None
