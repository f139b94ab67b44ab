"""Evaluations of trained models: held-out loss by position, retrieval, and what NSA's
selection does.

- :mod:`nsa.evals.tasks`: seeded pass-key needles and multi-query associative recall in real
  filler text, as prompts and as training documents (:func:`~nsa.evals.tasks.make_task_corpus`);
- :mod:`nsa.evals.loss`: loss and bits per byte, overall and per position bucket;
- :mod:`nsa.evals.needle`: retrieval accuracy through greedy ``generate()``, over context
  lengths x depths (needle) or context lengths (recall);
- :mod:`nsa.evals.selection`: how often the needle's block is selected, how many blocks
  neighbouring queries share, the gates per branch;
- :mod:`nsa.evals.run`: ``nsa eval {loss,needle,recall,selection} --checkpoint DIR``, which
  writes ``<kind>.json`` and ``<kind>.png``.

The evaluators take any object with the methods they call (``generate`` for retrieval,
``__call__`` returning ``.logits`` for the loss), so a stand-in whose answers are known tests
them: a perfect one scores 1, a random one the chance level. Plots need matplotlib
(``pip install 'nsa[plot]'``); :mod:`nsa.evals.run` needs the ``train`` extra.
"""

from .loss import evaluate_loss, plot_loss
from .needle import evaluate_needle, evaluate_recall, plot_needle, plot_recall
from .selection import capture_selection, evaluate_selection, plot_selection
from .tasks import TASKS, Filler, TaskSample, make_task_corpus, needle_sample, recall_sample

__all__ = ["tasks", "loss", "needle", "selection", "run", "TASKS", "Filler", "TaskSample", "needle_sample",
           "recall_sample", "make_task_corpus", "evaluate_loss", "evaluate_needle", "evaluate_recall",
           "evaluate_selection", "capture_selection", "plot_loss", "plot_needle", "plot_recall", "plot_selection"]
