"""Pipeline configs: TOML loading with inheritance and overrides, typed validation."""
from .loader import apply_override, deep_merge, load_raw
from .pipeline import build_pipeline, load_config, pipeline_to_dict

__all__ = ["apply_override", "build_pipeline", "deep_merge", "load_config", "load_raw", "pipeline_to_dict"]
