"""The ingest rules as plain values, built once from the ``[ingest]`` config table."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class EventTypeRule:
    """How one event type contributes to the strength of a (user, item) pair.

    Attributes
    ----------
    weight : float
        Strength of one event; negative for dislikes, returns, cancellations.
    use_value : bool
        Multiply the weight by the event's ``value`` (a null value counts as 1). A negative, NaN or
        infinite value is then rejected as ``invalid_value`` (unless ``absolute_value``).
    value_cap : float or None
        The value is capped at this before multiplying; ``None`` = no cap.
    absolute_value : bool
        Use ``|value|``: for sources that store returns as negative quantities (the Online Retail
        sample). A negative value is then valid; NaN and infinities are still rejected.
    """

    weight: float
    use_value: bool = False
    value_cap: float | None = None
    absolute_value: bool = False

    def __post_init__(self) -> None:
        if not math.isfinite(self.weight):
            raise ValueError(f"event type weight must be finite, got {self.weight!r}")
        if self.value_cap is not None and not (self.value_cap > 0 and math.isfinite(self.value_cap)):
            raise ValueError(f"value_cap must be a positive finite number or None, got {self.value_cap!r}")


@dataclass(frozen=True)
class IngestSettings:
    """Rules of the ingest stage; see ``docs/ingest.md`` for the meaning of each.

    ``half_life_days == 0`` turns decay off; ``max_events_per_user_day == 0`` turns the bot rule off.
    """

    lookback_days: int = 365
    half_life_days: float = 0.0
    max_id_length: int = 256
    min_events_per_user: int = 1
    min_events_per_item: int = 1
    k_core: bool = False
    max_events_per_user_day: int = 0
    max_reject_fraction: float = 0.05
    event_types: dict[str, EventTypeRule] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = {
            "lookback_days": self.lookback_days >= 1,
            "half_life_days": self.half_life_days >= 0 and math.isfinite(self.half_life_days),
            "max_id_length": self.max_id_length >= 1,
            "min_events_per_user": self.min_events_per_user >= 1,
            "min_events_per_item": self.min_events_per_item >= 1,
            "max_events_per_user_day": self.max_events_per_user_day >= 0,
            "max_reject_fraction": self.max_reject_fraction >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"ingest setting {name} has an invalid value {getattr(self, name)!r}")
        if not self.event_types:
            raise ValueError("ingest settings name no event types: every event would be rejected")

    @classmethod
    def from_config(cls, cfg_ingest: dict[str, Any]) -> IngestSettings:
        """Build from the validated ``[ingest]`` table (``cfg["ingest"]``); ``value_cap = 0`` is no cap."""
        rules = {
            name: EventTypeRule(
                weight=float(rule["weight"]),
                use_value=bool(rule["use_value"]),
                value_cap=float(rule["value_cap"]) if rule["value_cap"] else None,
                absolute_value=bool(rule.get("absolute_value", False)),
            )
            for name, rule in cfg_ingest["event_types"].items()
        }
        return cls(
            lookback_days=int(cfg_ingest["lookback_days"]),
            half_life_days=float(cfg_ingest["half_life_days"]),
            max_id_length=int(cfg_ingest["max_id_length"]),
            min_events_per_user=int(cfg_ingest["min_events_per_user"]),
            min_events_per_item=int(cfg_ingest["min_events_per_item"]),
            k_core=bool(cfg_ingest["k_core"]),
            max_events_per_user_day=int(cfg_ingest["max_events_per_user_day"]),
            max_reject_fraction=float(cfg_ingest["max_reject_fraction"]),
            event_types=rules,
        )
