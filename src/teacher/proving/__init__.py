"""The proving ground: pretraining the tiny presets on the synthetic world, and the demo's helpers."""
