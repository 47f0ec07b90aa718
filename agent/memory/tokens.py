"""How many tokens libmtmd makes of an image or a clip of audio, per projector type (tools/mtmd/clip.cpp,
mtmd-image.cpp): what an image or spoken turn costs in context, encode time and encode memory.

- gemma3nv (Gemma 3n, MobileNetV5): a fixed grid, image_size / patch_size tokens (256), whatever the bitmap.
- gemma4v (Gemma 4): the bitmap keeps its aspect ratio, each side rounded to a multiple of patch x merge (16 x 3 =
  48 px) within 70..1120 tokens, then 3 x 3 pooled: tokens = (w / 48) x (h / 48); 256 px -> 81, 512 -> 121,
  768 -> 256 (a camera frame is square at camera.input_size).
- gemma4a (Gemma 4 audio): 10 ms mel frames, then two stride-2 convolutions: 25 tokens per second, no padding.
- Others (ViT-style): (image_size / patch_size)^2.
"""

from __future__ import annotations

import math

from agent.gguf import GgufInfo

SAMPLE_RATE = 16_000
PATCH_MERGE = 3  # gemma4v: the pooler's kernel (clip.cpp: hparams.n_merge = 3)
MIN_IMAGE_TOKENS, MAX_IMAGE_TOKENS = 70, 1120  # gemma4v: clip.cpp set_limit_image_tokens(70, 1120)


def dyn_image_tokens(width: int, height: int, patch_size: int = 16, merge: int = PATCH_MERGE,
                     min_tokens: int = MIN_IMAGE_TOKENS, max_tokens: int = MAX_IMAGE_TOKENS) -> int:
    """Tokens of a width x height bitmap for a dynamic-size projector (mtmd-image.cpp calc_size_preserved_ratio)."""
    align = patch_size * merge
    min_px, max_px = min_tokens * align * align, max_tokens * align * align
    w, h = (max(align, math.floor(side / align + 0.5) * align) for side in (width, height))
    if w * h > max_px:
        beta = (height * width / max_px) ** 0.5
        w, h = (max(align, math.floor(side / beta / align) * align) for side in (width, height))
    elif w * h < min_px:
        beta = (min_px / (height * width)) ** 0.5
        w, h = (math.ceil(side * beta / align) * align for side in (width, height))
    return (w // align) * (h // align)


def audio_tokens(n_samples: int) -> int:
    """gemma4a tokens for `n_samples` of 16 kHz audio (~25 per second)."""
    frames = n_samples // 160
    for _ in range(2):
        frames = (frames - 1) // 2 + 1
    return frames


def image_tokens(info: GgufInfo, side: int) -> int:
    """Tokens of one square camera frame of `side` px for projector `info` (0 without a vision encoder)."""
    vision = info.projector_types()[0]
    md = info.metadata
    size, patch = int(md.get("clip.vision.image_size", 0) or 0), int(md.get("clip.vision.patch_size", 0) or 0)
    if not vision:
        return 0
    if vision == "gemma4v":
        return dyn_image_tokens(side, side, patch or 16)
    if not size or not patch:
        return 0
    return size // patch if vision == "gemma3nv" else (size // patch) ** 2


def audio_tokens_for(info: GgufInfo, seconds: float) -> int:
    """Tokens of `seconds` of speech for projector `info` (0 without an audio encoder it implements)."""
    audio = info.projector_types()[1]
    return audio_tokens(int(seconds * SAMPLE_RATE)) if audio == "gemma4a" else 0
