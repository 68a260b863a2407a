"""The evaluate stage: the report (teachers, base, gain, student), retention of the open vocabulary, the gallery."""
