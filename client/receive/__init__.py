"""Stage 1 of the agent: a desired state comes in and is admitted or refused.

`session` keeps the persistent MQTT session and acks a message only once the journal
has it on disk; `decide.admit` turns the facts about it into a frozen verdict.
"""
