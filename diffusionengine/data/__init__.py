"""Generated datasets of the data engine: the COCO writer and their registration for training.

Imports neither diffusers nor transformers (the config layer's ``prepare`` step imports
``diffusionengine.data.generated``).
"""
from .coco_writer import ANNOTATIONS_FILE, IMAGES_DIR, RECORD_FIELDS, GeneratedCocoWriter, reference_categories

__all__ = ["ANNOTATIONS_FILE", "IMAGES_DIR", "RECORD_FIELDS", "GeneratedCocoWriter", "reference_categories"]
