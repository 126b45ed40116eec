"""Training: one LightningModule for every family, recipes, quick runs and the LightningCLI entry."""
from .module import CifarClassifier
from .quick import train_quick
from .recipes import RECIPES, PaperSchedule, build_optimization, check_recipe, training_length

__all__ = ["CifarClassifier", "PaperSchedule", "RECIPES", "build_optimization", "check_recipe",
           "train_quick", "training_length"]
