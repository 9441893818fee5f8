"""MergeLab's merge library: mergekit-compatible configs, streaming merges, the method registry.

    from merging import MergeConfig, merge
    merge(MergeConfig.from_yaml("recipe.yml"), "out/merged")
"""

from .config import MergeConfig, MultiStageConfig, load_config
from .errors import MergeError
from .methods import METHODS, get_method
from .live import LiveMerge  # transformers is imported only when a LiveMerge is built
from .pipeline import merge, plan_stages


__all__ = ["MergeConfig", "MultiStageConfig", "MergeError", "METHODS", "get_method", "load_config",
           "merge", "plan_stages", "LiveMerge"]
