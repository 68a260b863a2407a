"""The data stages' library: inspection, validation, splitting, augmentation, the synthetic world and the bundled sample."""
