"""Operations: what watches every stage and reports on it. health.py builds the health snapshot (published retained
on `health`), metrics.py serves it as Prometheus text, sdnotify.py speaks systemd's notify protocol (READY, STATUS,
WATCHDOG only while every stage makes progress), logs.py formats log lines for a terminal or the journal.
"""
