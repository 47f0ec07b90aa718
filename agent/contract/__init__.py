"""The MQTT contract, in one place: topics (direction, QoS, retain, keys), what is accepted inbound, one typed
class per outbound message, the error codes, event types, stop reasons and sources, and the exit codes.

README.md's tables are the user-facing copy; tests/test_contract.py holds them equal to what is defined here, and
Home Assistant discovery and every publisher read from here, so the three cannot drift apart. Nothing here
imports another part of the agent.
"""
