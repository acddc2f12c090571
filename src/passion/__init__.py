"""passion: PASSION (Preference-Aware Self-diStillatION) for incomplete multi-modal segmentation."""
__version__ = "0.1.0"
