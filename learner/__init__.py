"""The learner: the estimators by name with their setup choices (``learner.estimators``, no
torch), pure algorithm math (``learner.algorithms``, torch only), model loading and forwards
(``learner.models``), training objectives (``learner.objectives``), and the engine that trains
one on a DeepSpeed rank (``learner.engine``). Importing this package imports nothing heavy."""
