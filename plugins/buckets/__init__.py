"""Built-in buckets: fixed and ratio (aspect-ratio bucketing, from ratios or from the images).

Registration imports only the attrs configs; bucket code loads when a pipeline uses it.
"""
from hcp_core.hookspecs import hookimpl
from hcp_core.registry import FamilyRegistry

from .config import FixedBucketConfig, RatioBucketConfig


@hookimpl
def hcp_register_buckets(registry: FamilyRegistry) -> None:
    registry.add("fixed", config=FixedBucketConfig, factory="hcp_plugins.buckets.fixed:FixedBucket")
    registry.add("ratio", config=RatioBucketConfig, factory="hcp_plugins.buckets.ratio:RatioBucket")
