"""The run: typed config and presets, datasets, actor placement, the driver loop, metrics, and the
job entry point ``python -m orchestration.train``. No other package imports this one."""
