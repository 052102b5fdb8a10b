"""fedepic: defending federated learning against data poisoning (EPIC, Witches' Brew, Gradient Purification).

The core package is pure torch/torchvision/numpy; it never imports flwr or ray.
"""

__version__ = "0.1.0"
