"""Shapes and file names every stage agrees on, in a module that imports nothing: training, export
and validation use them without pulling in the download stack (requests, PIL) or pyarrow."""

HEIGHT = WIDTH = 32
CHANNELS = 3
IMAGE_SHAPE = (HEIGHT, WIDTH, CHANNELS)  # uint8 HWC on disk; float32 HWC inside the models
MANIFEST = "manifest.json"  # in data/raw (what download verified) and in data/shards (what preprocess wrote)
