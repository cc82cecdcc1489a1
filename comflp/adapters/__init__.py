"""Models the pruning pipeline can work on, each behind :class:`PrunableModel`; every module of
this package registers its model type in :data:`MODEL_TYPES`."""

from comflp.adapters.base import MODEL_TYPES, PrunableModel, load_prunable

__all__ = ["MODEL_TYPES", "PrunableModel", "load_prunable"]
