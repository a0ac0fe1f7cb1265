"""File names shared by `split-digits` (the silos' side) and `train` (the coordinator's).

Kept free of TensorFlow, so that `flaap-mq --help` stays quick.
"""

DEFAULT_NAME = "digits"  # the silos' dataset, relative to each worker's --data-dir
TEST_FILE = "test.npz"  # the coordinator's held-out set, next to the silo directories
MANIFEST_FILE = "manifest.json"
