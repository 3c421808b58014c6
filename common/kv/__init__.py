"""KV storage and attention backends. The model forward only sees `KVBackend` (interface.py)."""
