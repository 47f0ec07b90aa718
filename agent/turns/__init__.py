"""Turns: what every input becomes. The router takes MQTT commands, utterances and motion, applies the vision and
listen policies and the rate limits, and hands `Request`s to the model's queue; the turn policy (wake phrase,
listen window, follow-up) decides which utterances become turns; the speech worker turns utterances into text or
audio; the conversation keeps the exchanges that fit. Nothing here knows llama.cpp or MQTT: requests leave
through `TurnQueue`, everything said back through `Output` (types.py).
"""
