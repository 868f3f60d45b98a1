"""The roles that run as Ray actors: the vLLM policy generator (all vLLM-facing code in
``actors.vllm_engine``), the frozen reference model, and the learner rank's actor shell. Each is
a plain class; ``orchestration.placement`` wraps it with ``ray.remote``."""
