"""Rewards: rule functions and verifiers (``rules``, ``verifiers``, ``code_verifier``), frozen
reward models (``reward_model``), the remote reward client and its Ray Serve server (``remote``,
``protocol``, ``server``), combination and shaping (``shaping``), and a pairwise reward-model
trainer (``train_rm``)."""
