"""The model: a bounded request queue and its worker (engine.py) in front of a backend, either a GGUF loaded here
through llama-cpp-python (local.py, with the multimodal projector in projector.py and the chat format in prompt.py)
or an OpenAI-compatible server (remote.py). loader.py checks the files and loads with the memory plan;
llama_shim.py holds every use of llama-cpp-python's private internals. Importing this package loads no llama.cpp:
modules import it when a model is loaded.
"""
