"""gemma-agent: a voice-and-camera agent for small Linux boards (Gemma via llama.cpp, text out over MQTT)."""
