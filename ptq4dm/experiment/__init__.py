"""A PTQ experiment: config -> recipe -> calibrated quantized model -> samples -> scores -> results."""

from ptq4dm.experiment.module import PTQModule
from ptq4dm.experiment.recipe import PTQRecipe, recipe_from_config

__all__ = ["PTQModule", "PTQRecipe", "recipe_from_config"]
