"""The error of a Hugging Face checkpoint this runtime cannot load exactly (its own module: core/hf/config.py
and the family modules it calls, such as gpt_oss.py, both raise it)."""
from __future__ import annotations


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint this runtime cannot load exactly; the message names the file and field."""
