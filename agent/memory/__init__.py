"""Memory under a cap: probe.py reads what the process and its cgroup hold and may hold; shape.py what a GGUF
header says about a model; estimate.py predicts one load setting's bytes; plan.py picks the fastest setting that
fits (or refuses with the table); apply.py drops cold pages after loading. The planner reads headers only: it
runs before llama.cpp is loaded and never needs it.
"""
