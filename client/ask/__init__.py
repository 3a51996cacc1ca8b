"""Stage 5 of the agent: asking people, and what happens when nobody answers.

The control socket (`control`, `prompt_tui`), a desktop notice (`notify`), Home
Assistant (`homeassistant`) and prompt deadlines (`deadline`).
"""
