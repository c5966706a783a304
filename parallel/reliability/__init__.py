"""Failure handling: the watchdog, collective fingerprints and fault injection."""
