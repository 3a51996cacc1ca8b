"""Flotilla's wire contract: topics, message models, codec, signatures. Pure, no I/O."""
