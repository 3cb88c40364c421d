"""Inference: compressed storage (`quantize`: packed INT4 with per-group scales)."""
