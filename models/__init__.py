"""Data only: the model catalog (catalog.yaml, read by agent.catalog) and, at run time, the downloaded model files.
No code lives here; it is a package so the catalog ships inside the wheel."""
