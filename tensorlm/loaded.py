""":class:`LoadedModel`, what every loader returns (dense, GGUF or compressed folder).

Its own module so that :mod:`tensorlm.models` (which resolves names and delegates compressed folders
to :mod:`tensorlm.io`) and :mod:`tensorlm.io` (which builds one) both import it at top level.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class LoadedModel:
    """A model ready for compression or evaluation.

    Attributes:
        model: the ``nn.Module`` in eval mode (Hugging Face call convention).
        tokenizer: its tokenizer.
        kind: ``"encoder"`` (judged by sentence embeddings) or ``"causal-lm"``.
        name: what the user asked for.
        notes: facts a report must state (e.g. which tensors are random).
        random_weights: some or all weights are random (an offline architecture without its checkpoint):
            results.json and report.md say so.
    """

    model: nn.Module
    tokenizer: object
    kind: str
    name: str
    notes: list[str] = field(default_factory=list)
    random_weights: bool = False


RANDOM_WEIGHTS_NOTE = "random weights"
"""The words every loader's note about random weights contains (read back from older manifests)."""


def says_random(notes: list[str]) -> bool:
    """Whether ``notes`` (a loader's or a manifest's) state that weights are random."""
    return any(RANDOM_WEIGHTS_NOTE in str(note) for note in notes)
