"""COCO at rest: reading and writing, boxes, images (decode, limits), detections, metrics (pycocotools)."""
