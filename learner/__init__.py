"""The learner: pure algorithm math (``learner.algorithms``, torch only) and, later, the
DeepSpeed policy and critic learner. Importing this package imports nothing heavy."""
