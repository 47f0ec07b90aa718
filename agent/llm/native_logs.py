"""llama.cpp's and libmtmd's log lines, routed to Python logging (they arrive in pieces, on any thread)."""

from __future__ import annotations

import ctypes
import logging
from typing import Any

_GGML_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_EXPECTED = ("using full-size SWA cache",)  # warnings about choices we make on purpose: logged at debug
_llama_log_state: dict[str, Any] = {}


def route_llama_logs() -> None:
    """Send llama.cpp's log lines (which arrive in pieces, on any thread) to the `llama.cpp` logger."""
    if _llama_log_state:
        return
    import llama_cpp

    logger = logging.getLogger("llama.cpp")
    pending: list[str] = []
    level = [logging.DEBUG]

    def callback(lvl: int, text: bytes, _data: Any) -> None:
        if lvl != 5:  # 5 = GGML_LOG_LEVEL_CONT: continues the previous line
            level[0] = _GGML_LEVELS.get(lvl, logging.DEBUG)
        pending.append(text.decode("utf-8", errors="replace"))
        if pending[-1].endswith("\n"):
            line = "".join(pending).rstrip()
            pending.clear()
            if line:
                logger.log(logging.DEBUG if any(e in line for e in _EXPECTED) else level[0], "%s", line)

    _llama_log_state["cb"] = llama_cpp.llama_log_callback(callback)  # keep a reference: C holds the pointer
    llama_cpp.llama_log_set(_llama_log_state["cb"], ctypes.c_void_p(0))
    from llama_cpp import mtmd_cpp  # libmtmd (projectors) logs through its own hooks

    mtmd_cpp.mtmd_log_set(_llama_log_state["cb"], ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(_llama_log_state["cb"], ctypes.c_void_p(0))
