"""The model files the agent knows how to fetch: catalog.py reads models/catalog.yaml (the data lives in the
top-level models/ folder, next to the downloaded files); download.py fetches, resumes and verifies them."""
