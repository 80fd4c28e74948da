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
    """

    model: nn.Module
    tokenizer: object
    kind: str
    name: str
    notes: list[str] = field(default_factory=list)
