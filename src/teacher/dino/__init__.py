"""Grounding DINO: model, adapted loss, data, training task, label maps, detection."""
