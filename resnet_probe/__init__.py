"""resnet_probe: measurements of why residual networks train and how they use their blocks."""
__version__ = "0.1.0"
