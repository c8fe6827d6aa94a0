"""dsdkit's version: one string, at the bottom layer, so every layer reads it without importing upward."""

__version__ = "0.1.0"
