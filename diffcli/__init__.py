"""diffcli — one command-line toolkit for diffusion models."""

__version__ = "0.1.0"
