"""Conversion of a trained QAT model into the deployable integer model, and its file format."""
from qatkit.convert.api import convert
from qatkit.convert.io import load, save
from qatkit.convert.runtime import IntegerModel

__all__ = ["IntegerModel", "convert", "load", "save"]
