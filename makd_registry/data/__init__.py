"""Data: raw examples (local files or hub datasets), tokenised per task, and batches.

* :mod:`.sources` — files and hub datasets through ``datasets``, with clear errors;
* :mod:`.tasks` — tokenisation for classification, QA, causal LM and instruction data;
* :mod:`.collate` — padded batches.
"""

from __future__ import annotations
