"""The teachers at work: Grounded-SAM predict, labeling a pool, export, and labeling with a student."""
