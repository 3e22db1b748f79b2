"""A trained model as the recipe leaves it and the tools read it: the training prompt
(``prompting``), the serving files (``serving``) and opening an ``epoch_N`` or ``step_N`` (``model``)."""
