"""Ready-made LightningModules and DataModules on offline data, for the main job, the examples and the YAML configs.

They know nothing about PEFT: every method is added by callbacks, exactly as in a user's own project.
"""

from peft_callbacks.demo.data import ChatTopicsDataModule, DigitsDataModule, minilm_path
from peft_callbacks.demo.modules import ImageClassifier, TextClassifier, load_matching_weights
from peft_callbacks.demo.toy import MLPClassifier, quiet_trainer, random_loader

__all__ = [
    "ChatTopicsDataModule",
    "DigitsDataModule",
    "ImageClassifier",
    "MLPClassifier",
    "TextClassifier",
    "load_matching_weights",
    "minilm_path",
    "quiet_trainer",
    "random_loader",
]
