"""Building blocks for segmentation and detection (issue 16): a synthetic inspection data set,
mask / COCO loaders with strict validation, dense-label SAE scoring, metrics and output parity.

Not yet wired into the pipeline; each module is usable on its own.
"""
