"""``teacher serve``: the fine-tuned teachers as a Label Studio ML backend (pre-labeling,
interactive SAM). Pure Label Studio format conversion in ``protocol``, ``label_config`` and
``brush``; image URLs in ``sources``; the only calls into ``teacher.inference.predict`` / ``teacher.sam`` in
``teachers``; HTTP in ``app``."""
