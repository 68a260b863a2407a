"""Training: the loop (loop.py), checkpoints, distributed launch, memory helpers, dvclive, the stage runner."""
