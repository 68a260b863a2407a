"""SAM: model and prepared images, data, training task, losses."""
