"""r1lab: DeepSeek-R1 reproduced end to end in PyTorch."""

__version__ = "0.1.0"
