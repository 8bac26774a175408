"""Config files: ``configs/NAME.py`` defines ``get_config(arg=None)`` (its experiment's
``defaults()``, its own settings, then :func:`experiments.common.apply_arg`). Run one with
``python run.py --config=configs/NAME.py[:ARG]``; a config that combines others imports them as
``configs.NAME`` (never by file path)."""
