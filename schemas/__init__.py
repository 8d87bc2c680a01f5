"""Record formats, vocabularies and stores shared by every part of vlp."""

from vlp.schemas.errors import SchemaError, StoreError
from vlp.schemas.record import SCHEMA_VERSION, FeatureRecord
from vlp.schemas.store import FeatureStore, FeatureStoreWriter
from vlp.schemas import vocab

__all__ = ["FeatureRecord", "FeatureStore", "FeatureStoreWriter", "SchemaError", "StoreError",
           "SCHEMA_VERSION", "vocab"]
