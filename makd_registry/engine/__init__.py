"""The engine behind ``makd run``.

* :mod:`.run` — the orchestration of one run (models, data, teacher training, train loop,
  evaluation, checkpoints, outputs);
* :mod:`.trainer` — one optimisation step, data order, checkpoint state;
* :mod:`.evaluate`, :mod:`.metrics` — validation metrics per task;
* :mod:`.optim` — AdamW and the learning-rate schedule;
* :mod:`.checkpoint` — atomic, resumable checkpoints;
* :mod:`.terms` — per-term loss values under hierarchical names;
* :mod:`.reporting`, :mod:`.plots` — ``metrics.jsonl``, the progress bar, PNG plots;
* :mod:`.teacher` — training the teacher itself (``teacher.finetune``), cached;
* :mod:`.distributed` — multi-process data parallelism under ``torchrun``;
* :mod:`.memory` — the ``--dry-run`` memory estimate.
"""

from __future__ import annotations
