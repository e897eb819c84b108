"""Stage 1: slides → tiles → features (imported as `mil.extract`)."""
