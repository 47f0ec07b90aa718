"""Model catalog (catalog.yaml) and the resumable, checksum-verified downloader (fetch.py); no weights."""
