"""Test scaffolding shared by the tests and the benchmarks (never installed): a real broker and MQTT client, the
daemon as a subprocess, generated media (video, speech, noise) and tiny random-weight models."""
