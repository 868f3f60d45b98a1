"""Rewards: rule-based reward functions (``reward_service.rules``) and the scorer that appends
``score`` and ``reward/<name>`` columns to rollout tables (``reward_service.scorer``)."""
