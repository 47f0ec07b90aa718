"""MQTT, the agent's only output: client.py is the one connection (availability and last will, reconnects,
subscriptions, durable sends through the SQLite outbox in outbox.py); sink.py turns what the other stages say
into the contract's messages; discovery.py announces the device to Home Assistant.
"""
