"""Training: the recipe's optimizer and learning-rate schedule, and the epoch loop around Keras fit."""
