"""Quality evaluation: reference sets, OCR baselines, scoring and reports (docs/evaluation.md)."""
