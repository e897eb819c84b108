"""Whole-slide images → tiles → features: tissue, grid, tiles, reader, encoders, features."""
