"""The learner: pure algorithm math (``learner.algorithms``, torch only), model loading and
forwards (``learner.models``), and one DeepSpeed rank of the policy and critic learner
(``learner.worker``). Importing this package imports nothing heavy."""
