"""The saved state of an ID vocabulary (raw ID -> embedding row), as it
lies in the full model's ``model.pt``, the online checkpoint and a full
release's ``user_tower.pt``: plain lists, so it loads with torch's
``weights_only``. Written and read by ``trainer.vocabulary.IdVocabulary``;
a reader that only needs row -> ID (the publisher, ``freshtower run``)
takes ``row_ids`` from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from freshtower.core.contracts.validation import CONTRACT_CONFIG, as_dict, decode


@dataclass(frozen=True, kw_only=True)
class VocabularyState:
    """
    >>> state = VocabularyState(min_count=1, expiry_days=None, row_ids=["", "u1"], last_seen=[0, 3], pending_ids=[], pending=[])
    >>> VocabularyState.from_payload(state.to_payload()) == state
    True
    """

    __pydantic_config__ = CONTRACT_CONFIG

    min_count: int  # sightings before an ID gets its own row
    expiry_days: int | None  # an ID unseen this many days loses its row (None: never)
    row_ids: list[str]  # row -> raw ID; "" for the shared default row 0 and for free rows
    last_seen: list[int]  # row -> last day seen (days since the epoch)
    pending_ids: list[str]  # IDs seen fewer than min_count times ...
    pending: list[list[int]]  # ... and their [sightings, last day seen]

    def to_payload(self) -> dict:
        return as_dict(self)

    @classmethod
    def from_payload(cls, payload: Mapping, where: Path | str = "<vocabulary state>") -> "VocabularyState":
        return decode(cls, payload, where)
