"""Contribution valuation: who made the model better in each round, and by how much (issue 7)."""

from coordinator.attribution.first_order import first_order_values
from coordinator.attribution.game import CoalitionGame
from coordinator.attribution.history import VALUE_SCALE, AttributionAccount, to_value_units
from coordinator.attribution.reputation import ReputationBook
from coordinator.attribution.sampling import SampledValues, sampled_shapley
from coordinator.attribution.screens import ScreenFlag, ScreenReason, ScreenReport, ScreenSettings, screen_updates
from coordinator.attribution.shapley import EXACT_MAX_PLAYERS, exact_shapley
from coordinator.attribution.valuation import (
    RoundUpdates,
    RoundValuation,
    ValuationMethod,
    ValuationSettings,
    round_seed,
    value_round,
)

__all__ = [
    "EXACT_MAX_PLAYERS",
    "VALUE_SCALE",
    "AttributionAccount",
    "CoalitionGame",
    "ReputationBook",
    "RoundUpdates",
    "RoundValuation",
    "SampledValues",
    "ScreenFlag",
    "ScreenReason",
    "ScreenReport",
    "ScreenSettings",
    "ValuationMethod",
    "ValuationSettings",
    "exact_shapley",
    "first_order_values",
    "round_seed",
    "sampled_shapley",
    "screen_updates",
    "to_value_units",
    "value_round",
]
