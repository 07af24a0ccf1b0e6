"""Rollout: inference engines, Ray rollout workers, their manager, weight sync and stopping rules.

Imports cispo.core and cispo.algo only (docs/architecture.md); optional engines (vllm) load when selected.
"""

from rollout.engine import Engine, available_engines, build_engine, register_engine
from rollout.manager import LocalRolloutManager, RolloutManager
from rollout.weight_sync import NcclWeightSync, ObjectStoreWeightSync
from rollout.worker import RolloutWorker

__all__ = [
    "Engine",
    "LocalRolloutManager",
    "NcclWeightSync",
    "ObjectStoreWeightSync",
    "RolloutManager",
    "RolloutWorker",
    "available_engines",
    "build_engine",
    "register_engine",
]
