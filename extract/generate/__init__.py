"""Data sets made or converted here: synthetic slides, needle image sets, crops, classical MIL tables."""
