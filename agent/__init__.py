"""gemma-agent: a voice-and-camera agent for small Linux boards (Gemma via llama.cpp, text out over MQTT)."""

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    try:
        return version("gemma-agent")
    except PackageNotFoundError:
        return "0+unknown"
