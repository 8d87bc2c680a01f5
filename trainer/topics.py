"""Topic sets for TITP/TITS at training time.

W ∩ L has one definition, :func:`vlp.schemas.labels.topics` (the one ``vlp-build topics``
writes the ``topics`` column with); the trainer uses that column when a pair store has
it and otherwise calls the same function here, per example.
"""

from __future__ import annotations

from vlp.schemas.labels import topics


def pair_topics(text: str, objects_id) -> list[str]:
    """W ∩ L of one pair from its image's detector ``objects_id``."""
    return list(topics(text, [int(i) for i in objects_id]))
