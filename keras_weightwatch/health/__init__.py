"""Training health: findings that say what is wrong, in which layer, since when.

`rules` holds the rules (pure functions over stored statistics), `measures` the per-unit
reductions they read, `monitor` runs them snapshot after snapshot, live (`Monitor`) or on a
stored run (`diagnose`, behind `weightwatch doctor`). docs/HEALTH.md documents every rule.
"""

from .monitor import Diagnosis, Monitor, diagnose
from .rules import DEFAULTS, RULE_NAMES, RULES, Finding, ModelFacts, Thresholds

__all__ = ["DEFAULTS", "RULES", "RULE_NAMES", "Diagnosis", "Finding", "ModelFacts",
           "Monitor", "Thresholds", "diagnose"]
