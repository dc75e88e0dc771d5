"""Engine statistics (stats.py) and what consumes them: the periodic log line and Prometheus (loggers.py)."""
