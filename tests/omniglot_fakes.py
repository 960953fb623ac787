"""The Omniglot fakes under the names the Omniglot tests import: trees of 1-bit stroke drawings in the real layout
(see :mod:`datamodules.synthetic`, which the benchmarks share)."""

from datamodules.synthetic import OMNIGLOT_BACKGROUND as BACKGROUND
from datamodules.synthetic import OMNIGLOT_EVALUATION as EVALUATION
from datamodules.synthetic import write_omniglot_torchvision_layout as write_torchvision_layout
from datamodules.synthetic import write_omniglot_tree as write_tree
from datamodules.synthetic import zip_omniglot_tree as zip_tree

__all__ = ["BACKGROUND", "EVALUATION", "write_torchvision_layout", "write_tree", "zip_tree"]
