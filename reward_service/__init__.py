"""Rewards: rule functions and verifiers (``rules``, ``verifiers``, ``code_verifier``), frozen
reward models (``reward_model``), the remote reward client and its Ray Serve server (``remote``,
``protocol``, ``server``), and combination and shaping (``shaping``). Reward models are trained
on the learner engine (``stage: rm``, or ``orchestration.train_rm`` in one process)."""
